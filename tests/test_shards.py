"""WebDataset shards as a dataset source: make-shards, sidecar indexes, training like the folder the shards
came from, exact resume after SIGKILL, two torchrun ranks, damaged shards, patterns and path errors."""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import kill_at_checkpoint, run_cli, run_torchrun, train_here
from engine import checkpoints
from engine import config as cfg
from engine.data import shards as shard_source
from engine.data.index import DataWarning
from engine.data.make_shards import make_shards
from engine.data.sampler import BucketBatchSampler
from engine.data.sources import scan_images
from engine.errors import UserError
from engine.testing import tiny_config

STEPS = {"trainer.max_steps": 8, "checkpoint.every_n_train_steps": 4, "sampling.interval_steps": 0}
PER_SHARD = 3
KEY = "config key 'data.concepts[0].instance_set.path'"


def train_values(output_dir, path, **overrides):
    """The tiny demo fine-tuned on captions alone, from a folder or shards."""
    return tiny_config(output_dir, **{"prior_preservation.enabled": False,
                                      "data.concepts": [{"instance_set": {"path": str(path),
                                                                          "prompt": "{TXT_PROMPT}"}}],
                                      **STEPS, **overrides})


def newest_unet(output_dir):
    (run_dir,) = (output_dir / "tiny-demo").iterdir()
    newest = checkpoints.latest_checkpoint(run_dir)
    return load_file(newest / "unet" / "diffusion_pytorch_model.safetensors"), newest.name


def worst_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def shard_dir(sample_data, tmp_path_factory):
    target = tmp_path_factory.mktemp("shards") / "finetune"
    result = run_cli("make-shards", str(sample_data / "finetune"), str(target), "--per-shard", str(PER_SHARD))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"{target / '000000.tar'}: 3 samples, {os.path.getsize(target / '000000.tar')} bytes"
    assert lines[-1].startswith(f"wrote 32 samples to 11 shards in {target}")
    return target


@pytest.fixture(scope="module")
def folder_unet(sample_data, tmp_path_factory, one_torch_thread):
    """The tiny model after STEPS on the captioned sample folder, batch 2."""
    output = tmp_path_factory.mktemp("folder-run")
    train_here(train_values(output, sample_data / "finetune"))
    return newest_unet(output)


def test_make_shards_writes_the_folder_in_name_order_with_sidecar_indexes(shard_dir, sample_data):
    names = sorted(p.name for p in (sample_data / "finetune").glob("*.png"))
    shards = sorted(shard_dir.glob("*.tar"))
    assert [p.name for p in shards] == [f"{i:06d}.tar" for i in range(11)]
    members = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members += tar.getnames()
    assert [m for m in members if m.endswith(".png")] == names
    index = json.loads((shard_dir / "000000.tar.idx.json").read_text())
    first = index["samples"][0]
    with Image.open(sample_data / "finetune" / names[0]) as image:
        assert (first["key"], first["member"], first["width"], first["height"]) == (
            names[0][:-4], names[0], *image.size)
    with open(shard_dir / "000000.tar", "rb") as handle:
        handle.seek(first["offset"])
        assert handle.read(first["size"]) == (sample_data / "finetune" / names[0]).read_bytes()
    assert first["caption"] == (sample_data / "finetune" / names[0].replace(".png", ".txt")).read_text()
    with pytest.raises(UserError, match=f"^make-shards DST: {shard_dir} already holds .tar shards; name an "
                                        "empty folder$"):
        make_shards(str(sample_data / "finetune"), str(shard_dir), PER_SHARD)


def test_shard_records_equal_the_folder_records_and_pixels(shard_dir, sample_data):
    folder = scan_images(str(sample_data / "finetune"), "{TXT_PROMPT}", KEY).records
    shards = scan_images(str(shard_dir), "{TXT_PROMPT}", KEY).records
    pattern = scan_images(str(shard_dir / "{000000..000010}.tar"), "{TXT_PROMPT}", KEY).records
    assert len(folder) == len(shards) == 32 and list(pattern) == list(shards)
    assert [(r.width, r.height, r.caption) for r in folder] == [(r.width, r.height, r.caption) for r in shards]
    assert shards[0].path == f"{shard_dir / '000000.tar'}#{os.path.basename(folder[0].path)}"
    from engine.data.dataset import load_image

    for a, b in zip(folder[:4], shards[:4]):
        assert np.array_equal(np.asarray(load_image(a.path)), np.asarray(load_image(b.path)))


def test_shards_train_to_the_weights_of_their_folder(shard_dir, folder_unet, tmp_path, one_torch_thread):
    train_here(train_values(tmp_path, shard_dir))
    weights, name = newest_unet(tmp_path)
    assert name == folder_unet[1] == "step-00000008"
    assert worst_difference(weights, folder_unet[0]) <= 1e-6


def test_sigkill_then_resume_over_shards_is_exact(shard_dir, folder_unet, tmp_path, monkeypatch):
    # Data-loader workers read the shards here, each with its own open files.
    config_path = tmp_path / "shards.yaml"
    config_path.write_text(yaml.safe_dump(train_values(tmp_path / "out", shard_dir, num_workers=2)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch's spinning threads slow runs on shared cores
    kill_at_checkpoint(config_path, "step-00000004")
    (run_dir,) = (tmp_path / "out" / "tiny-demo").iterdir()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 4 <= steps[-1] < 8, "the kill must land mid-run"
    resumed = run_cli("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    weights, name = newest_unet(tmp_path / "out")
    assert name == "step-00000008"
    assert worst_difference(weights, folder_unet[0]) <= 1e-6


def test_two_gloo_ranks_over_shards_train_like_one_process(shard_dir, folder_unet, tmp_path):
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(train_values(tmp_path / "ddp", shard_dir, batch_size=1)))
    result = run_torchrun(2, "--config", str(tmp_path / "ddp.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    weights, name = newest_unet(tmp_path / "ddp")
    assert name == "step-00000008"
    assert worst_difference(weights, folder_unet[0]) <= 1e-5


@pytest.mark.parametrize("world_size,batch_size", [(2, 1), (2, 2), (3, 2)])
def test_each_shard_sample_is_visited_once_per_epoch_over_the_ranks(shard_dir, world_size, batch_size):
    from engine.data.buckets import plan_buckets

    config = cfg.from_dict(train_values("unused", shard_dir, **{"aspect_ratio_bucket.enabled": True}))
    records = scan_images(str(shard_dir), "", KEY).records
    plan = plan_buckets(config, records)
    buckets = np.asarray(plan.assignments)
    for epoch in range(3):
        seen = [i for rank in range(world_size)
                for batch in BucketBatchSampler(buckets, batch_size, 7, rank, world_size).epoch_batches(epoch)
                for i in batch]
        assert len(seen) == len(set(seen))
        # Only a bucket's last few, fewer than the ranks, sit an epoch out.
        for bucket in np.unique(buckets):
            members = set(np.flatnonzero(buckets == bucket).tolist())
            assert len(members) - len(members & set(seen)) < world_size


def write_shard(path, samples):
    """A tar of (member name, bytes)."""
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(size, colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_truncated_shard_keeps_its_complete_members_and_an_unreadable_one_is_skipped(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "a.tar", [(f"s{i}.png", png_bytes((16, 8))) for i in range(3)])
    data = (folder / "a.tar").read_bytes()
    with tarfile.open(folder / "a.tar") as tar:
        third = tar.getmember("s2.png")
    (folder / "a.tar").write_bytes(data[:third.offset_data + 10])  # cut inside the third image
    (folder / "b.tar").write_bytes(b"not a tar archive at all" * 40)
    with pytest.warns(DataWarning) as caught:
        result = scan_images(str(folder), "p", KEY)
    messages = [str(w.message) for w in caught]
    assert [os.path.basename(r.path) for r in result.records] == ["a.tar#s0.png", "a.tar#s1.png"]
    assert any(m.startswith(f"{folder / 'a.tar'}: the shard is cut short") and "s1.png" in m for m in messages)
    assert any(m.startswith(f"skipping {folder / 'b.tar'}: not a readable tar file") for m in messages)
    assert [path for path, _ in result.skipped] == [str(folder / "b.tar")]


def test_a_shard_cut_between_members_keeps_them_all_with_a_warning(tmp_path):
    write_shard(tmp_path / "a.tar", [("s0.png", png_bytes((8, 8))), ("s1.png", png_bytes((8, 8)))])
    with tarfile.open(tmp_path / "a.tar") as tar:
        end = tar.getmember("s1.png").offset_data + 512
    (tmp_path / "a.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:end])  # no end-of-archive blocks
    with pytest.warns(DataWarning, match="no end-of-archive marker"):
        assert len(scan_images(str(tmp_path / "a.tar"), "p", KEY).records) == 2


def test_corrupt_members_are_skipped_naming_shard_and_member(tmp_path):
    good = png_bytes((16, 16))
    # The header and end marker are intact, the compressed pixels are not: caught only when decoded.
    broken = bytearray(good)
    start = broken.index(b"IDAT") + 4
    broken[start:start + 8] = b"\xff" * 8
    write_shard(tmp_path / "a.tar", [("0.png", good), ("1.png", b"\x89PNG garbage"), ("2.png", bytes(broken)),
                                     ("3.png", good), ("4.txt", b"a caption without an image")])
    shard = tmp_path / "a.tar"
    with pytest.warns(DataWarning) as caught:
        records = scan_images(str(shard), "p", KEY).records
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"skipping {shard}#1.png: cannot read image") for m in messages)
    assert any(m.startswith(f"skipping {shard}#4: the sample has no image") for m in messages)
    assert [os.path.basename(r.path) for r in records] == ["a.tar#0.png", "a.tar#2.png", "a.tar#3.png"]

    from engine.data.dataset import DreamBoothDataset

    class Tokenizer:
        model_max_length = 8

        def __call__(self, text, **kwargs):
            return type("Ids", (), {"input_ids": [1, 2]})()

    dataset = DreamBoothDataset(records, [0, 0, 0], [(16, 16)], Tokenizer(), center_crop=True, seed=0)
    with pytest.warns(DataWarning, match=rf"skipping {shard}#2\.png: cannot decode it"):
        item = dataset[1]
    assert item["instance"]["pixel_values"].shape == (3, 16, 16)


def test_json_captions_and_caption_warnings(tmp_path):
    write_shard(tmp_path / "a.tar", [("x.png", png_bytes((8, 8))), ("x.json", json.dumps({"text": " a cat "}).encode()),
                                     ("y.png", png_bytes((8, 8))), ("y.json", b'{"other": 1}'),
                                     ("z.png", png_bytes((8, 8)))])
    with pytest.warns(DataWarning) as caught:
        records = scan_images(str(tmp_path / "a.tar"), "photo, {TXT_PROMPT}", KEY).records
    assert [r.caption for r in records] == ["photo, a cat", "photo", "photo"]
    messages = sorted(str(w.message) for w in caught)
    assert messages == [f'{tmp_path / "a.tar"}#y.png: the JSON has no "caption" or "text" text field; using the '
                        "prompt without it",
                        f"{tmp_path / 'a.tar'}#z.png: no caption (.txt or .json); using the prompt without it"]


def test_sidecars_are_rebuilt_when_the_shard_changes_and_go_to_the_cache_when_the_folder_is_not_writable(
        tmp_path, demo_cache):
    shard = tmp_path / "a.tar"
    write_shard(shard, [("x.png", png_bytes((8, 8)))])
    # A folder standing where the sidecar would go makes it unwritable there, even for root.
    (tmp_path / "a.tar.idx.json").mkdir()
    assert [(r.width, r.height) for r in scan_images(str(shard), "p", KEY).records] == [(8, 8)]
    stored = shard_source.sidecar_locations(str(shard), os.stat(shard))[1]
    assert stored.is_file() and stored.is_relative_to(demo_cache)
    write_shard(shard, [("x.png", png_bytes((24, 8)))])
    os.utime(shard, ns=(1, 1))  # whatever the clock's resolution, the shard looks changed
    assert [(r.width, r.height) for r in scan_images(str(shard), "p", KEY).records] == [(24, 8)]
    shutil.rmtree(tmp_path / "a.tar.idx.json")
    os.utime(shard, ns=(2, 2))
    scan_images(str(shard), "p", KEY)
    assert json.loads((tmp_path / "a.tar.idx.json").read_text())["samples"][0]["width"] == 24


def _read_all(paths):
    return [shard_source.image_file(path).getvalue() for path in paths]


def test_forked_workers_read_members_through_their_own_files(shard_dir):
    import multiprocessing

    paths = [r.path for r in scan_images(str(shard_dir), "p", KEY).records]
    expected = _read_all(paths)  # leaves this process's files open at some position
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_read_all, [paths[::2], paths[1::2]]) == [expected[::2], expected[1::2]]


def test_latent_cache_keys_follow_the_shard(tmp_path):
    from engine.data.cache import latent_key

    shard = tmp_path / "a.tar"
    write_shard(shard, [("x.png", png_bytes((8, 8))), ("y.png", png_bytes((8, 8)))])
    x, y = (r.path for r in scan_images(str(shard), "p", KEY).records)
    first = latent_key(x, (8, 8))
    assert first != latent_key(y, (8, 8)) and first == latent_key(x, (8, 8))
    os.utime(shard, ns=(5, 5))
    assert latent_key(x, (8, 8)) != first


def test_patterns_expand_and_bad_paths_fail_with_one_line_naming_the_key(shard_dir, tmp_path):
    assert len(scan_images(str(shard_dir / "{000000..000001}.tar"), "p", KEY).records) == 6
    assert len(scan_images(str(shard_dir / "{000000,000010}.tar"), "p", KEY).records) == 5
    (tmp_path / "notes.md").write_text("neither")
    cases = [(str(shard_dir / "{000000..000020}.tar"), "10 of the 21 shards of"),
             (str(shard_dir / "{000000..000001.tar"), "unbalanced braces"),
             (str(tmp_path / "missing"), "not found; expected a folder of images, a folder of .tar shards or a "
                                         "shard pattern such as shards/{000000..000009}.tar"),
             (str(tmp_path / "notes.md"), "is a file; expected a folder of images")]
    for path, expected in cases:
        with pytest.raises(UserError) as raised:
            scan_images(path, "p", KEY)
        message = str(raised.value)
        assert message.startswith(KEY + ": ") and expected in message and "\n" not in message


def test_class_images_are_not_generated_into_shards(shard_dir, tmp_path):
    from engine.classgen import plan_class_images

    values = tiny_config(tmp_path, **{"data.concepts[0].class_set.path": str(shard_dir)})
    with pytest.raises(UserError, match=r"^config key 'data.concepts\[0\].class_set.auto_generate.enabled': class "
                                        "images are generated into a folder of images, but"):
        plan_class_images(cfg.from_dict(values))


def test_the_dataset_tab_reports_buckets_and_draws_thumbnails_from_shard_members(shard_dir, tmp_path):
    from scal_gui import bucket_view

    config = cfg.from_dict(train_values(tmp_path, shard_dir, **{"aspect_ratio_bucket.enabled": True}))
    result = bucket_view.report(config)
    assert sum(b["count"] for b in result["buckets"]) == 32 and result["skipped"] == []
    used = [b for b in result["buckets"] if b["count"]]
    label = bucket_view.bucket_label(used[0])
    thumbnails = bucket_view.thumbnails(result, label, tmp_path / "thumbs")
    assert len(thumbnails) == used[0]["count"]
    path, caption = thumbnails[0]
    assert caption.startswith("000") and ".tar#shapes_" in caption
    with Image.open(path) as image:
        assert max(image.size) == 192
