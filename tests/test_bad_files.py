"""Bad input files, each of which either trains correctly or is reported in one line (a warning naming the
file, or an error naming the config key): captions in UTF-16/32, huge captions and special files, edited
shard sidecars, samples with two images, huge shard patterns, file names that are not UTF-8, a cache
folder that cannot be written, and extreme aspect ratios without buckets."""
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from test_shards import write_shard
from engine import config as cfg
from engine.data import shards as shard_source
from engine.data.buckets import plan_buckets
from engine.data.dataset import load_image
from engine.data.headers import MAX_CAPTION_BYTES
from engine.data.index import DataWarning, scan_folder
from engine.data.make_shards import make_shards
from engine.errors import UserError
from engine.testing import tiny_config

KEY = "config key 'data.concepts[0].instance_set.path'"
CAPTION = "a photo of café"
RED, BLUE = (220, 0, 0), (0, 0, 220)


def png(path, size=(16, 16), color=RED):
    Image.new("RGB", size, color).save(path, format="PNG")


def png_bytes(size=(16, 16), color=RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def isolated(code: str, timeout: float = 60) -> dict:
    """Run code (which prints one JSON line last) in a child process with 2 GiB of address space and a
    time limit, so that a regression that reads without bound or blocks fails instead of taking the
    machine or the test run with it."""
    preamble = ("import json, os, resource, sys, warnings\n"
                "resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))\n"
                f"sys.path.insert(0, {str(ROOT)!r})\n")
    result = subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


# -- captions: byte-order marks, size, special files -------------------------------------------------------------

BOM_ENCODINGS = ["utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32", "utf-32-be-bom", "utf-8-sig"]


def bom_encoded(text: str, encoding: str) -> bytes:
    if encoding == "utf-16-le-bom":
        return b"\xff\xfe" + text.encode("utf-16-le")
    if encoding == "utf-16-be-bom":
        return b"\xfe\xff" + text.encode("utf-16-be")
    if encoding == "utf-32-be-bom":
        return b"\x00\x00\xfe\xff" + text.encode("utf-32-be")
    return text.encode(encoding)


@pytest.mark.parametrize("encoding", BOM_ENCODINGS)
def test_a_caption_with_a_byte_order_mark_is_read_in_its_encoding(tmp_path, encoding):
    folder = tmp_path / "folder"
    folder.mkdir()
    png(folder / "a.png")
    (folder / "a.txt").write_bytes(bom_encoded(CAPTION + "\r\n", encoding))
    write_shard(tmp_path / "shard.tar", [("a.png", png_bytes()), ("a.txt", (folder / "a.txt").read_bytes())])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # correctly decoded: nothing to warn about
        (record,) = scan_folder(str(folder), "{TXT_PROMPT}").records
        (member,) = shard_source.scan_shards([str(tmp_path / "shard.tar")], "{TXT_PROMPT}").records
    assert record.caption == member.caption == CAPTION


def test_a_caption_over_the_limit_is_cut_there_with_one_warning(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    png(folder / "long.png")
    words = ("é word " * (3 * MAX_CAPTION_BYTES // 8)).encode("utf-8")
    (folder / "long.txt").write_bytes(words)
    write_shard(tmp_path / "shard.tar", [("long.png", png_bytes()), ("long.txt", words)])
    with pytest.warns(DataWarning) as caught:
        (record,) = scan_folder(str(folder), "{TXT_PROMPT}").records
        (member,) = shard_source.scan_shards([str(tmp_path / "shard.tar")], "{TXT_PROMPT}").records
    expected = words[:MAX_CAPTION_BYTES].decode("utf-8", errors="ignore").strip()
    assert record.caption == member.caption == expected
    messages = [str(w.message) for w in caught]
    assert messages == [f"{folder / 'long.txt'}: caption longer than {MAX_CAPTION_BYTES} bytes; cut there",
                        f"{tmp_path / 'shard.tar'}#long.png: caption longer than {MAX_CAPTION_BYTES} bytes; "
                        "cut there"]


def test_special_files_are_never_read_whole_nor_waited_on(tmp_path):
    """A caption linked to /dev/zero, a named pipe called pipe.png and one called b.txt: the scan ends at
    once, skips the pipe image and uses the two images without those captions, each with a warning."""
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    os.symlink("/dev/zero", tmp_path / "a.txt")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "b.txt")
    found = isolated(f"""
from engine.data.index import scan_folder
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = scan_folder({str(tmp_path)!r}, "sks {{TXT_PROMPT}}")
print(json.dumps({{"records": [[os.path.basename(r.path), r.caption] for r in result.records],
                  "skipped": [[os.path.basename(p), why] for p, why in result.skipped],
                  "warnings": [str(w.message) for w in caught]}}))
""")
    assert found["records"] == [["a.png", "sks"], ["b.png", "sks"]]
    assert found["skipped"] == [["pipe.png", "cannot read image: OSError: not a regular file but a named pipe"]]
    assert [w for w in found["warnings"] if not w.startswith("skipping")] == [
        f"{tmp_path / 'a.txt'}: cannot read the caption: not a regular file but a character device; using the "
        "prompt without it",
        f"{tmp_path / 'b.txt'}: cannot read the caption: not a regular file but a named pipe; using the prompt "
        "without it"]


def test_a_named_pipe_among_shards_is_skipped(tmp_path):
    write_shard(tmp_path / "000000.tar", [("a.png", png_bytes()), ("a.txt", b"one")])
    os.mkfifo(tmp_path / "000001.tar")
    found = isolated(f"""
from engine.data.sources import scan_images
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = scan_images({str(tmp_path)!r}, "{{TXT_PROMPT}}", "key")
print(json.dumps({{"captions": [r.caption for r in result.records], "warnings": [str(w.message) for w in caught]}}))
""")
    assert found == {"captions": ["one"],
                     "warnings": [f"skipping {str(tmp_path / '000001.tar')!r}: not a regular file"]}


# -- shards: sidecars checked against the tar, samples with two images, patterns ---------------------------------

def test_an_edited_sidecar_never_gives_one_sample_another_samples_pixels(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    png(source / "img0.png", color=RED)
    png(source / "img1.png", color=BLUE)
    (source / "img0.txt").write_text("red", encoding="utf-8")
    (source / "img1.txt").write_text("blue", encoding="utf-8")
    (shard,) = make_shards(str(source), str(tmp_path / "shards"), per_shard=2, say=lambda line: None)
    sidecar = shard + shard_source.SIDECAR_SUFFIX
    index = json.loads(open(sidecar, encoding="utf-8").read())
    first, second = index["samples"]
    first["offset"], first["size"] = second["offset"], second["size"]
    with open(sidecar, "w", encoding="utf-8") as handle:
        json.dump(index, handle)
    shard_source._open_shards.reset()
    records = shard_source.scan_shards([shard], "{TXT_PROMPT}").records
    with pytest.warns(DataWarning, match="its index does not match the shard"):
        pixels = {record.caption: load_image(record.path).getpixel((8, 8)) for record in records}
    assert pixels == {"red": RED, "blue": BLUE}
    # The sidecar was rebuilt from the shard.
    assert json.loads(open(sidecar, encoding="utf-8").read())["samples"][0]["offset"] != second["offset"]


def test_a_second_image_of_a_sample_is_reported_as_skipped(tmp_path):
    shard = str(tmp_path / "hand-made.tar")
    write_shard(shard, [("dup.png", png_bytes(color=RED)), ("dup.png", png_bytes(color=BLUE)), ("dup.txt", b"dup"),
                      ("pair.jpg", png_bytes(color=RED)), ("pair.png", png_bytes(color=BLUE)), ("pair.txt", b"pair"),
                      ("pair.txt", b"other")])
    shard_source._open_shards.reset()
    with pytest.warns(DataWarning) as caught:
        result = shard_source.scan_shards([shard], "{TXT_PROMPT}")
    assert [(os.path.basename(r.path), r.caption) for r in result.records] == [
        ("hand-made.tar#dup.png", "dup"), ("hand-made.tar#pair.jpg", "pair")]
    assert [(os.path.basename(path), why) for path, why in result.skipped] == [
        ("hand-made.tar#dup.png", "a second image of sample 'dup', which uses dup.png"),
        ("hand-made.tar#pair.png", "a second image of sample 'pair', which uses pair.jpg"),
        ("hand-made.tar#pair.txt", "a second member named pair.txt in sample 'pair'; the first is used")]
    assert len(caught) == 3 and all(str(w.message).startswith("skipping ") for w in caught)
    # The first dup.png is the one read.
    assert load_image(result.records[0].path).getpixel((8, 8)) == RED


def test_a_shard_pattern_naming_too_many_shards_is_refused_before_expanding(tmp_path):
    pattern = str(tmp_path / "{000000..999999999}.tar")
    found = isolated(f"""
from engine.data.shards import shard_paths
from engine.errors import UserError
try:
    shard_paths({pattern!r}, "key")
except UserError as error:
    print(json.dumps(str(error)))
""", timeout=30)
    assert found == (f"key: the shard pattern {pattern} names 1000000000 shards, more than the "
                     f"{shard_source.MAX_PATTERN_SHARDS} a pattern may name")


def test_a_shard_pattern_within_the_limit_expands_as_before(tmp_path):
    for number in range(3):
        write_shard(tmp_path / f"{number:06d}.tar", [("a.png", png_bytes())])
    assert shard_source.shard_paths(str(tmp_path / "{000000..000002}.tar"), KEY) == [
        str(tmp_path / f"{number:06d}.tar") for number in range(3)]
    with pytest.raises(UserError, match="3 of the 4 shards"):
        shard_source.shard_paths(str(tmp_path / "{000001,{000003..000005}}.tar"), KEY)


# -- file names that are not UTF-8 -------------------------------------------------------------------------------

LATIN1 = os.fsdecode(b"caf\xe9")


@pytest.fixture
def latin1_folder(tmp_path):
    folder = tmp_path / "source"
    folder.mkdir()
    for index, name in enumerate((LATIN1, "plain")):
        png(folder / f"{name}.png", size=(64, 64), color=(RED, BLUE)[index])
        (folder / f"{name}.txt").write_text(name.encode("utf-8", "surrogateescape").decode("latin-1"),
                                            encoding="utf-8")
    return folder


def temp_files(*folders):
    return [path for folder in folders for path in folder.rglob("*") if ".tmp" in path.name]


def test_names_that_are_not_utf8_scan_make_shards_and_read(latin1_folder, tmp_path):
    records = scan_folder(str(latin1_folder), "{TXT_PROMPT}").records
    assert [(os.path.basename(r.path), r.caption) for r in records] == [(f"{LATIN1}.png", "café"),
                                                                         ("plain.png", "plain")]
    target = tmp_path / "shards"
    shards = make_shards(str(latin1_folder), str(target), per_shard=1, say=lambda line: None)
    assert temp_files(target) == []
    shard_source._open_shards.reset()
    members = shard_source.scan_shards(shards, "{TXT_PROMPT}").records
    assert [(os.path.basename(r.path), r.caption) for r in members] == [(f"000000.tar#{LATIN1}.png", "café"),
                                                                         ("000001.tar#plain.png", "plain")]
    assert load_image(members[0].path).getpixel((8, 8)) == RED
    # Indexed again from the sidecar just written, as the next run does.
    shard_source._open_shards.reset()
    again = shard_source.scan_shards(shards, "{TXT_PROMPT}").records
    assert [r.path for r in again] == [r.path for r in members]


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_names_that_are_not_utf8_train_with_cached_latents(latin1_folder, tmp_path, sample_data, source):
    from engine.train import Trainer
    from engine import events

    path = latin1_folder
    if source == "shards":
        path = tmp_path / "shards"
        make_shards(str(latin1_folder), str(path), per_shard=1, say=lambda line: None)
    values = tiny_config(tmp_path / "out", **{
        "prior_preservation.enabled": False, "trainer.max_steps": 2, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": None, "cache.dir": str(tmp_path / "cache"), "cache.latents": True,
        "data.concepts": [{"instance_set": {"path": str(path), "prompt": "{TXT_PROMPT}"}}]})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    assert temp_files(tmp_path) == []


# -- a cache folder that cannot be written -----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["read-only", "under a file"])
def test_a_cache_folder_that_cannot_be_written_leaves_the_run_uncached(tmp_path, sample_data, where):
    from engine import events
    from engine.train import Trainer

    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        cache = tmp_path / "cache"
        cache.mkdir()
        cache.chmod(0o555)
    else:
        (tmp_path / "file").write_text("not a folder")
        cache = tmp_path / "file" / "cache"
    values = tiny_config(tmp_path / "run", **{
        "prior_preservation.enabled": False, "trainer.max_steps": 2, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": None, "cache.dir": str(cache), "cache.latents": True,
        "cache.text_embeddings": True, "cache.fill": "before_training"})
    logged = []
    result = Trainer(cfg.from_dict(values), on_event=lambda e: logged.append(e.message)
                     if isinstance(e, events.Log) and e.level == "warning" else None).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    assert len(logged) == 1 and logged[0].startswith("the cache cannot be written (")
    assert logged[0].endswith("); training goes on without it")


# -- extreme aspect ratios ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bucketing", [False, True])
def test_an_extreme_aspect_ratio_is_skipped_with_or_without_buckets(tmp_path, bucketing):
    from engine.data.records import ImageRecord

    records = [ImageRecord("strip.png", 64, 80000), ImageRecord("wide.png", 160, 90),
               ImageRecord("square.png", 64, 64)]
    config = cfg.from_dict(tiny_config(tmp_path, **{"aspect_ratio_bucket.enabled": bucketing}))
    with pytest.warns(DataWarning, match="skipping strip.png: aspect ratio 64x80000"):
        plan = plan_buckets(config, records)
    assert [r.path for r in plan.kept] == ["wide.png", "square.png"]
    assert [path for path, _ in plan.skipped] == ["strip.png"]


def test_an_extreme_aspect_ratio_in_a_folder_is_skipped_before_its_pixels_are_read(tmp_path):
    from engine.data.prepare import prepare_data
    from engine.models.sd import load_components

    png(tmp_path / "strip.png", size=(8, 4000))
    png(tmp_path / "square.png", size=(64, 64))
    config = cfg.from_dict(tiny_config(tmp_path / "out", **{
        "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": str(tmp_path), "prompt": "sks"}}]}))
    with pytest.warns(DataWarning, match="strip.png: aspect ratio 8x4000"):
        data = prepare_data(config, load_components(config.model).tokenizer, seed=0)
    assert data.images == 1 and [os.path.basename(p) for p, _ in data.skipped] == ["strip.png"]
    assert np.isfinite(data.dataset[0]["instance"]["pixel_values"].numpy()).all()


def test_make_shards_names_a_special_file_it_leaves_out(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for index in range(2):
        Image.new("RGB", (16, 16)).save(source / f"img{index}.png")
    os.mkfifo(source / "pipe.png")
    said = []
    written = make_shards(str(source), str(tmp_path / "dst"), per_shard=10, say=said.append)
    assert len(written) == 1 and "skipping pipe.png: not a regular file" in said


def test_a_make_shards_run_that_fails_removes_its_shards_so_a_rerun_starts_clean(tmp_path, monkeypatch):
    import errno

    from engine.data import make_shards as module

    source = tmp_path / "src"
    source.mkdir()
    for index in range(5):
        Image.new("RGB", (16, 16)).save(source / f"img{index}.png")
    read = module._read

    def fails_at_the_fourth(folder, name):
        if name == "img3.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "dst" / "000001.tar"))
        return read(folder, name)

    monkeypatch.setattr(module, "_read", fails_at_the_fourth)
    with pytest.raises(UserError, match=r"^make-shards: No space left on device .*the shards written so far were"):
        make_shards(str(source), str(tmp_path / "dst"), per_shard=2, say=lambda message: None)
    assert os.listdir(tmp_path / "dst") == []
    monkeypatch.setattr(module, "_read", read)
    assert len(make_shards(str(source), str(tmp_path / "dst"), per_shard=2, say=lambda message: None)) == 3
