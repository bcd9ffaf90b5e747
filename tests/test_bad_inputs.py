"""A corpus of bad inputs, each made here, each with its exact outcome: used, or skipped with a reason."""
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_cli
from engine import config as cfg
from engine.data.buckets import plan_buckets
from engine.data.index import scan_folder
from engine.testing import tiny_config


def png_declaring(width, height):
    """A valid small PNG whose header claims width x height pixels."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def rotated_jpeg(path):
    """Stored 64 wide x 32 high, left half red, right half blue, with EXIF orientation 6 (display
    rotated 90° clockwise): upright it is 32 x 64 with red on top."""
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs")
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 100, 100)).save(folder / f"good{i}.png")
        (folder / f"good{i}.txt").write_text(f"good picture {i}")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:int(len(data) * 0.7)])  # header intact, pixels cut off
    (folder / "empty.png").write_bytes(b"")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    deep = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))
    deep.save(folder / "deep.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    rotated_jpeg(folder / "rotated.jpg")
    (folder / "bomb.png").write_bytes(png_declaring(30000, 30000))
    (folder / "notimage.png").write_text("this is a text file, not a picture")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    Image.new("RGB", (64, 64), (8, 8, 8)).save(folder / "emptycap.png")
    (folder / "emptycap.txt").write_text("")
    Image.new("RGB", (64, 64), (7, 7, 7)).save(folder / "nocap.png")
    os.symlink(folder / "missing-target.png", folder / "unreadable.png")
    return folder


USED = {"good0.png", "good1.png", "good2.png", "good3.png", "cmyk.jpg", "deep.png", "palette.png", "rotated.jpg",
        "latin1.png", "emptycap.png", "nocap.png"}
SKIPPED = {
    "truncated.jpg": "truncated JPEG file: its end marker is missing",
    "empty.png": "cannot read image",
    "bomb.png": "image too large to decode safely",
    "notimage.png": "cannot read image",
    "tiny.png": "too small to train: 8x8 px",
    "unreadable.png": "cannot read image",
}


def scan_and_plan(folder):
    config = cfg.from_dict(tiny_config("/tmp", **{"data.resolution": 128}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scanned = scan_folder(str(folder), "{TXT_PROMPT}", "instance folder")
        plan = plan_buckets(config, scanned.records)
    return scanned, plan, [str(w.message) for w in caught]


def test_each_bad_input_is_used_or_skipped_with_its_reason(corpus):
    scanned, plan, messages = scan_and_plan(corpus)
    used = {os.path.basename(r.path) for r in plan.kept}
    assert used == USED
    skipped = {os.path.basename(p): reason for p, reason in scanned.skipped + plan.skipped}
    assert set(skipped) == set(SKIPPED)
    for name, reason in SKIPPED.items():
        assert reason in skipped[name], (name, skipped[name])
        assert any(name in m and "skipping" in m for m in messages), name
    captions = {os.path.basename(r.path): r.caption for r in scanned.records}
    assert captions["latin1.png"] == "café au lait"
    assert captions["emptycap.png"] == "" and captions["nocap.png"] == ""
    assert any("latin1.txt: caption is not UTF-8" in m for m in messages)
    assert any("emptycap.txt: the caption is empty" in m for m in messages)
    assert any("nocap.png: no caption file nocap.txt" in m for m in messages)


def test_usable_odd_formats_decode_to_rgb_and_exif_rotation_is_upright(corpus, tiny_model):
    from engine.data.dataset import DreamBoothDataset
    from engine.models.sd import load_components

    scanned, plan, _ = scan_and_plan(corpus)
    records = {os.path.basename(r.path): r for r in plan.kept}
    assert (records["rotated.jpg"].width, records["rotated.jpg"].height) == (32, 64)
    tokenizer = load_components(str(tiny_model)).tokenizer
    names = ["cmyk.jpg", "deep.png", "palette.png", "rotated.jpg"]
    dataset = DreamBoothDataset([records[n] for n in names], [0] * 4, [(32, 64)], tokenizer, center_crop=True,
                                seed=0)
    pixels = {n: dataset[i]["instance"]["pixel_values"] for i, n in enumerate(names)}
    assert all(p.shape == (3, 64, 32) for p in pixels.values())
    rotated = (pixels["rotated.jpg"] + 1) * 127.5
    top, bottom = rotated[:, :24].mean(dim=(1, 2)), rotated[:, 40:].mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue below
    transparent_half = (pixels["palette.png"][:, :, 20:] + 1) * 127.5  # crop columns 36-47: transparent
    assert transparent_half.min() > 250  # transparency composited on white
    assert ((pixels["deep.png"] + 1) * 127.5).mean() > 100  # 16-bit values scaled, not clipped to black


def test_training_over_the_corpus_reports_what_was_skipped(corpus, tmp_path):
    values = tiny_config(tmp_path, **{
        "prior_preservation.enabled": False, "trainer.max_steps": 3, "sampling.interval_steps": 0,
        "data.resolution": 128,
        "data.concepts": [{"instance_set": {"path": str(corpus), "prompt": "{TXT_PROMPT}"}}]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(values))
    result = run_cli("train", "--config", str(tmp_path / "bad.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"({len(USED)} images, {len(SKIPPED)} skipped)" in result.stdout
    for name, reason in SKIPPED.items():
        assert f"skipped {corpus / name}: " in result.stdout
        assert reason in result.stdout


def one_line_failure(result, expected):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


def test_a_folder_with_no_images_fails_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    values = tiny_config(tmp_path, **{"prior_preservation.enabled": False,
                                      "data.concepts": [{"instance_set": {"path": str(tmp_path / "empty"),
                                                                          "prompt": "x"}}]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    one_line_failure(run_cli("train", "--config", str(tmp_path / "c.yaml")), str(tmp_path / "empty"))


def test_an_output_folder_that_cannot_be_written_fails_with_one_line(tmp_path, class_images):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("train", "--config", "presets/tiny-demo-cpu.yaml", "--set", f"output_dir={blocker / 'runs'}")
    one_line_failure(result, "config key 'output_dir': cannot create")


def test_yaml_with_a_syntax_error_fails_with_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("model: demo:tiny-sd\ndata: {resolution: 64\n")
    one_line_failure(run_cli("train", "--config", str(tmp_path / "broken.yaml")), "YAML syntax error at line")
