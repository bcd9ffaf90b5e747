"""The offline demo assets: a tiny SD pipeline with real SD geometry, and the synthetic dataset."""
import hashlib
import re

from PIL import Image

from conftest import run_cli


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
