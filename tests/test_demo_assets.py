"""The offline demo assets: a tiny SD pipeline with real SD geometry, and the synthetic dataset."""
import hashlib
import os
import re
import subprocess
import sys

from PIL import Image

from conftest import ROOT, run_cli


def folder_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_tiny_model_is_small_deterministic_and_generates(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    first, second = tmp_path / "a", tmp_path / "b"
    for target in (first, second):
        result = run_cli("make-tiny-model", str(target))
        assert result.returncode == 0, result.stderr
    assert folder_digest(first) == folder_digest(second)
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024

    pipeline = StableDiffusionPipeline.from_pretrained(first)
    assert pipeline.vae_scale_factor == 8
    latents = pipeline.vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)
    image = pipeline("a sks toy", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_sample_data_has_mixed_aspects_and_captions(tmp_path):
    result = run_cli("make-sample-data", str(tmp_path))
    assert result.returncode == 0, result.stderr
    instance = sorted((tmp_path / "instance").glob("*.png"))
    assert len(instance) >= 8
    sizes = [Image.open(p).size for p in instance]
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert (tmp_path / "class").is_dir() and not list((tmp_path / "class").iterdir())
    finetune = sorted((tmp_path / "finetune").glob("*.png"))
    assert len(finetune) >= 32
    for image_path in finetune:
        caption = image_path.with_suffix(".txt").read_text()
        assert re.fullmatch(r"a \w+ (circle|square|triangle)( and a \w+ (circle|square|triangle))? "
                            r"on a (black|white) background", caption), caption


def test_sample_data_has_edit_pairs_that_an_edit_model_reads(tmp_path, monkeypatch):
    """edit/: each target beside its control (the same shape, another colour, one size) and the instruction
    between them; a sample dataset written before it had the pairs gains them. (An edit model trains on them in
    test_combinations' qwen-image-edit preset.)"""
    from engine import paths

    result = run_cli("make-sample-data", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "data" / "edit"
    targets = sorted(folder.glob("pair_??.png"))
    assert len(targets) == 8 and len({Image.open(p).size for p in targets}) == 3
    for target in targets:
        control = folder / f"{target.stem}.control.png"
        assert Image.open(control).size == Image.open(target).size
        assert Image.open(control).getcolors(256) != Image.open(target).getcolors(256)
        before = [colour for colour in Image.open(control).getcolors(256) if colour[1] != (245, 245, 245)]
        assert len(before) == 1
        assert re.fullmatch(r"make the (circle|square|triangle) \w+", target.with_suffix(".txt").read_text())

    cache = tmp_path / "cache"
    (cache / "sample-data" / "instance").mkdir(parents=True)
    monkeypatch.setenv("SCAL_SDT_CACHE", str(cache))
    assert folder_digest(paths.demo_data_dir() / "edit") == folder_digest(folder)


# Each child builds the sample data, then waits until the other has built too, so both rename at nearly
# the same moment.
RACING_BUILD = """
import sys, time
from pathlib import Path
from engine import paths
from engine.models import tiny

barrier, name = Path(sys.argv[1]), sys.argv[2]
build = tiny.make_sample_data

def build_then_wait(directory):
    build(directory)
    # Nobody renames before both have arrived here, so a complete build must not show yet.
    assert not (paths.cache_dir() / "sample-data").exists()
    (barrier / name).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)

tiny.make_sample_data = build_then_wait
print(paths.demo_data_dir())
"""


def test_processes_building_at_once_leave_one_complete_folder(tmp_path):
    from engine.models.tiny import make_sample_data

    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "SCAL_SDT_CACHE": str(cache)}
    children = [subprocess.Popen([sys.executable, "-c", RACING_BUILD, str(barrier), name], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in ("first", "second")]
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (_, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr
    assert sorted(p.name for p in barrier.iterdir()) == ["first", "second"]
    assert {stdout.strip() for stdout, _ in outputs} == {str(cache / "sample-data")}
    assert [p.name for p in cache.iterdir()] == ["sample-data"]
    assert folder_digest(cache / "sample-data") == folder_digest(make_sample_data(tmp_path / "reference"))


INTERRUPTED_BUILD = """
import os
from engine import paths
from engine.models import tiny

def build_and_die(directory):
    (directory / "finetune").mkdir()
    os._exit(9)

tiny.make_sample_data = build_and_die
paths.demo_data_dir()
"""


def test_an_interrupted_build_is_not_taken_for_a_finished_one(tmp_path, monkeypatch):
    from engine import paths
    from engine.models.tiny import make_sample_data

    cache = tmp_path / "cache"
    env = {**os.environ, "SCAL_SDT_CACHE": str(cache)}
    killed = subprocess.run([sys.executable, "-c", INTERRUPTED_BUILD], cwd=ROOT, env=env, timeout=120)
    assert killed.returncode == 9
    leftovers = list(cache.iterdir())
    assert len(leftovers) == 1 and (leftovers[0] / "finetune").is_dir()

    monkeypatch.setenv("SCAL_SDT_CACHE", str(cache))
    built = paths.demo_data_dir()
    assert built == cache / "sample-data"
    assert folder_digest(built) == folder_digest(make_sample_data(tmp_path / "reference"))
