"""The dataset index: header-only scans, re-opening without reading images, skip reasons, captions."""
import json
import os
import sys
import warnings

import pytest
from PIL import Image

from engine.data import index as dataset_index
from engine.data.index import INDEX_NAME, DataWarning, scan_folder


def write_image(path, size, fmt=None, **save_args):
    Image.new("RGB", size, (120, 30, 200)).save(path, format=fmt, **save_args)


@pytest.fixture
def count_opens(monkeypatch):
    """Every path PIL is asked to open during the test."""
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(os.path.basename(str(fp)))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_sizes_come_from_headers_in_every_format_and_names_are_sorted(tmp_path):
    for name, size, fmt in (("b.png", (40, 20), "PNG"), ("a.jpg", (30, 50), "JPEG"), ("c.jpeg", (24, 24), "JPEG"),
                            ("d.webp", (64, 16), "WEBP"), ("e.bmp", (10, 70), "BMP"), ("f.PNG", (12, 12), "PNG")):
        write_image(tmp_path / name, size, fmt)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "deep.png", (8, 8))
    result = scan_folder(str(tmp_path), "a photo")
    assert [(os.path.basename(r.path), r.width, r.height) for r in result.records] == [
        ("a.jpg", 30, 50), ("b.png", 40, 20), ("c.jpeg", 24, 24), ("d.webp", 64, 16), ("e.bmp", 10, 70),
        ("f.PNG", 12, 12)]
    assert all(r.caption == "a photo" for r in result.records) and result.skipped == []


def test_scanning_never_decodes_pixels(tmp_path, monkeypatch):
    for index in range(3):
        write_image(tmp_path / f"{index}.png", (32, 16))
    write_image(tmp_path / "x.jpg", (16, 32), "JPEG")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    assert len(scan_folder(str(tmp_path), "p").records) == 4
    assert decoded == []


def test_exif_rotated_jpeg_has_its_sides_swapped(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    write_image(tmp_path / "rotated.jpg", (40, 20), "JPEG", exif=exif)
    exif[0x0112] = 3  # 180 degrees: sides unchanged
    write_image(tmp_path / "upside.jpg", (40, 20), "JPEG", exif=exif)
    records = {os.path.basename(r.path): (r.width, r.height) for r in scan_folder(str(tmp_path), "p").records}
    assert records == {"rotated.jpg": (20, 40), "upside.jpg": (40, 20)}


def test_reopening_an_unchanged_folder_reads_no_image_and_a_changed_file_is_reread(tmp_path, count_opens):
    for index in range(5):
        write_image(tmp_path / f"img{index}.png", (32 + index * 8, 32))
    first = scan_folder(str(tmp_path), "p")
    assert sorted(count_opens) == [f"img{i}.png" for i in range(5)]
    assert (tmp_path / INDEX_NAME).is_file()

    count_opens.clear()
    again = scan_folder(str(tmp_path), "p")
    assert count_opens == []
    assert again.records == first.records

    changed = tmp_path / "img2.png"
    write_image(changed, (96, 48))
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))  # a different mtime whatever the clock resolution
    write_image(tmp_path / "new.png", (16, 64))
    (tmp_path / "img4.png").unlink()
    third = scan_folder(str(tmp_path), "p")
    assert sorted(count_opens) == ["img2.png", "new.png"]
    sizes = {os.path.basename(r.path): (r.width, r.height) for r in third.records}
    assert sizes == {"img0.png": (32, 32), "img1.png": (40, 32), "img2.png": (96, 48), "img3.png": (56, 32),
                     "new.png": (16, 64)}


def test_corrupt_and_unreadable_files_are_skipped_with_a_named_reason(tmp_path):
    write_image(tmp_path / "good.png", (32, 32))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.webp").write_text("hello")
    with pytest.warns(DataWarning) as caught:
        result = scan_folder(str(tmp_path), "p")
    assert [os.path.basename(r.path) for r in result.records] == ["good.png"]
    skipped = {os.path.basename(path): reason for path, reason in result.skipped}
    assert set(skipped) == {"broken.png", "empty.jpg", "text.webp"}
    assert all(reason.startswith("cannot read image") for reason in skipped.values())
    messages = [str(w.message) for w in caught]
    for name in skipped:
        assert any(str(tmp_path / name) in m for m in messages)
    # Remembered in the index, and still reported on the next scan.
    with pytest.warns(DataWarning):
        assert len(scan_folder(str(tmp_path), "p").skipped) == 3


def test_decompression_bombs_are_skipped_from_the_header(tmp_path, monkeypatch):
    write_image(tmp_path / "small.png", (20, 20))
    write_image(tmp_path / "large.png", (40, 40))  # over the limit: PIL would only warn
    write_image(tmp_path / "huge.png", (60, 50))  # over twice the limit: PIL refuses to open it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(DataWarning) as caught:
        result = scan_folder(str(tmp_path), "p")
    assert sorted(os.path.basename(str(w.message).split(":")[0]) for w in caught) == ["huge.png", "large.png"]
    assert [os.path.basename(r.path) for r in result.records] == ["small.png"]
    reasons = {os.path.basename(path): reason for path, reason in result.skipped}
    assert set(reasons) == {"large.png", "huge.png"}
    assert all(reason.startswith("image too large to decode safely") for reason in reasons.values())
    assert "1600 pixels" in reasons["large.png"] and "3000 pixels" in reasons["huge.png"]


def test_captions_follow_the_txt_file_and_its_changes(tmp_path, count_opens):
    write_image(tmp_path / "a.png", (32, 32))
    write_image(tmp_path / "b.png", (32, 32))
    (tmp_path / "a.txt").write_text("a red circle\n", encoding="utf-8")
    with pytest.warns(DataWarning, match="no caption file b.txt"):
        result = scan_folder(str(tmp_path), "sks, {TXT_PROMPT}")
    assert [r.caption for r in result.records] == ["sks, a red circle", "sks"]

    (tmp_path / "a.txt").write_text("a blue square", encoding="utf-8")
    os.utime(tmp_path / "a.txt", ns=(2_000_000_000, 2_000_000_000))
    (tmp_path / "b.txt").write_text("\ufeffgreen star", encoding="utf-8")  # a BOM is not part of the caption
    count_opens.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = scan_folder(str(tmp_path), "{TXT_PROMPT}")
    assert [r.caption for r in result.records] == ["a blue square", "green star"]
    assert count_opens == []  # new captions, but no image re-read
    # A prompt without {TXT_PROMPT} does not need the captions and keeps them in the index.
    assert [r.caption for r in scan_folder(str(tmp_path), "plain").records] == ["plain", "plain"]
    stored = json.loads((tmp_path / INDEX_NAME).read_text(encoding="utf-8"))
    assert stored["captions"]["texts"] == ["a blue square", "green star"]


def test_a_latin1_caption_warns_and_is_read(tmp_path):
    write_image(tmp_path / "x.png", (32, 32))
    (tmp_path / "x.txt").write_bytes("café crème".encode("latin-1"))
    for _ in range(2):  # the warning repeats when the caption comes from the index
        with pytest.warns(DataWarning, match=r"x\.txt: caption is not UTF-8"):
            (record,) = scan_folder(str(tmp_path), "{TXT_PROMPT}").records
        assert record.caption == "café crème"


def test_the_index_falls_back_to_the_cache_folder_when_the_dataset_is_read_only(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_image(data / "a.png", (32, 16))
    in_folder, in_cache = dataset_index.index_locations(data)
    real_write = type(in_folder).write_bytes

    def refuse_dataset_folder(self, content):
        if self.parent == data:
            raise PermissionError(13, "Permission denied")
        return real_write(self, content)

    monkeypatch.setattr(type(in_folder), "write_bytes", refuse_dataset_folder)
    scan_folder(str(data), "p")
    assert not in_folder.exists() and in_cache.is_file()
    assert in_cache.parent.parent == dataset_index.paths.cache_dir()
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    assert len(scan_folder(str(data), "p").records) == 1
    assert opened == []


def test_a_corrupt_index_is_ignored_and_rewritten(tmp_path):
    write_image(tmp_path / "a.png", (24, 16))
    (tmp_path / INDEX_NAME).write_text("{not json")
    (record,) = scan_folder(str(tmp_path), "p").records
    assert (record.width, record.height) == (24, 16)
    assert json.loads((tmp_path / INDEX_NAME).read_text())["images"]["names"] == ["a.png"]


def test_scanning_imports_neither_torch_nor_numpy(tmp_path):
    import subprocess

    write_image(tmp_path / "a.png", (24, 16))
    code = ("import sys; from engine.data.index import scan_folder; scan_folder(sys.argv[1], 'p'); "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == "[]"
