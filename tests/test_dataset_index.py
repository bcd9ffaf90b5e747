"""The dataset index: header-only scans, re-opening without reading images, skip reasons, captions, the
on-disk format, packed string columns, the lazy records (also through data preparation), the pool of
readers and vectorised bucket assignment."""
import gc
import json
import os
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
from PIL import Image

from engine import config as cfg
from engine.data import index as dataset_index
from engine.data import index_store
from engine.data.buckets import MAX_UPSCALE, bucket_sizes, plan_buckets
from engine.data.index import INDEX_NAME, DataWarning, ImageRecord, scan_folder


def write_image(path, size, fmt=None, **save_args):
    Image.new("RGB", size, (120, 30, 200)).save(path, format=fmt, **save_args)


@pytest.fixture
def count_opens(monkeypatch):
    """Every path PIL is asked to open during the test."""
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(os.path.basename(str(getattr(fp, "name", fp))))
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


def test_files_are_told_apart_by_extension_in_any_case(tmp_path):
    names = ["Zebra.JPG", "apple.Png", "été.webp", "été.txt", "a.b.png", "x.jpeg.txt", "._mac.png", ".hidden.jpg",
             "notes.md", "noext", "ü.bmp"]
    for name in names:
        if name.endswith(".txt") or name in ("notes.md", "noext"):
            (tmp_path / name).write_text("caption", encoding="utf-8")
        else:
            write_image(tmp_path / name, (16, 16), "PNG")
    (tmp_path / "folder.png").mkdir()
    with pytest.warns(DataWarning) as caught:
        result = scan_folder(str(tmp_path), "{TXT_PROMPT}")
    images = ["Zebra.JPG", "a.b.png", "apple.Png", "été.webp", "ü.bmp"]
    assert [os.path.basename(r.path) for r in result.records] == sorted(images)
    assert [os.path.basename(p) for p, _ in result.skipped] == ["folder.png"]
    assert {os.path.basename(r.path): r.caption for r in result.records}["été.webp"] == "caption"
    assert sum("no caption file" in str(w.message) for w in caught) == 4


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

    write_image(tmp_path / "img0.png", (8, 8))  # changed in place: the same names, one new size
    os.utime(tmp_path / "img0.png", ns=(3_000_000_000, 3_000_000_000))
    assert (scan_folder(str(tmp_path), "p").records[0].width, count_opens) == (8, ["img0.png"])
    count_opens.clear()

    changed = tmp_path / "img2.png"
    write_image(changed, (96, 48))
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))  # a different mtime whatever the clock resolution
    write_image(tmp_path / "new.png", (16, 64))
    (tmp_path / "img4.png").unlink()
    third = scan_folder(str(tmp_path), "p")
    assert sorted(count_opens) == ["img2.png", "new.png"]
    sizes = {os.path.basename(r.path): (r.width, r.height) for r in third.records}
    assert sizes == {"img0.png": (8, 8), "img1.png": (40, 32), "img2.png": (96, 48), "img3.png": (56, 32),
                     "new.png": (16, 64)}
    # The refreshed index holds each file's new size and mtime, and the name order rebuilt from the
    # stored one equals a sort of the names.
    images = index_store.load(tmp_path / INDEX_NAME)["images"]
    rows = {images["names"].name(row): row for row in range(len(images["names"]))}
    assert sorted(rows) == ["img0.png", "img1.png", "img2.png", "img3.png", "new.png"]
    for name in ("new.png", "img2.png", "img0.png"):
        found = os.stat(tmp_path / name)
        assert (images["sizes"][rows[name]], images["mtimes"][rows[name]]) == (found.st_size, found.st_mtime_ns)
    assert (images["widths"][rows["img2.png"]], images["heights"][rows["img2.png"]]) == (96, 48)
    order = index_store.load(tmp_path / INDEX_NAME)["image_order"]["rows"]
    assert order.tolist() == images["names"].sorted_rows().tolist()
    assert [images["names"].name(row) for row in order] == sorted(rows)


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
    stored = index_store.load(tmp_path / INDEX_NAME)["captions"]
    assert {stored["names"].name(i): stored["texts"][i] for i in range(2)} == {"a.txt": b"a blue square",
                                                                             "b.txt": b"green star"}

    # A deleted caption is missed, a new one found, without reading any image.
    (tmp_path / "a.txt").unlink()
    with pytest.warns(DataWarning, match="no caption file a.txt"):
        result = scan_folder(str(tmp_path), "{TXT_PROMPT}")
    assert [r.caption for r in result.records] == ["", "green star"]
    (tmp_path / "a.txt").write_text("back again", encoding="utf-8")
    assert [r.caption for r in scan_folder(str(tmp_path), "{TXT_PROMPT}").records] == ["back again", "green star"]
    assert count_opens == []


def test_a_folder_without_any_caption_gives_each_image_the_prompt_without_one(tmp_path):
    # What an image without a caption file gets beside captioned ones (see the test above), with no .txt
    # in the folder at all.
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name, (32, 32))
    for _ in range(2):  # scanned, then read from the index
        with pytest.warns(DataWarning) as caught:
            result = scan_folder(str(tmp_path), "sks, {TXT_PROMPT}")
        assert [r.caption for r in result.records] == ["sks", "sks"]
        assert sorted(str(w.message).split(": ", 1)[1] for w in caught) == [
            "no caption file a.txt for {TXT_PROMPT}; using the prompt without it",
            "no caption file b.txt for {TXT_PROMPT}; using the prompt without it"]
    with pytest.warns(DataWarning, match="no caption file"):
        assert [r.caption for r in scan_folder(str(tmp_path), "{TXT_PROMPT}").records] == ["", ""]
    # The caption links of two images and no caption: -1 for each.
    from engine.data.columns import Packed

    names = Packed.from_names(["a.png", "b.png"])
    assert dataset_index._caption_rows(names, Packed.empty()).tolist() == [-1, -1]


def test_of_two_captions_for_one_image_the_later_in_name_order_is_used(tmp_path):
    captions = {"a.TXT": "upper", "a.txt": "lower", "b.TXT": "upper", "b.Txt": "mixed", "c.txt": "only"}
    for name, text in captions.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    if len(os.listdir(tmp_path)) < len(captions):
        pytest.skip("the file system does not tell names apart by case")
    for stem in "abc":
        write_image(tmp_path / f"{stem}.png", (16, 16))
    records = scan_folder(str(tmp_path), "{TXT_PROMPT}").records
    assert [record.caption for record in records] == ["lower", "mixed", "only"]  # a.txt, b.Txt, c.txt


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
    real_save = index_store.save

    def refuse_dataset_folder(path, tables):
        if path.parent == data:
            raise PermissionError(13, "Permission denied")
        return real_save(path, tables)

    monkeypatch.setattr(index_store, "save", refuse_dataset_folder)
    scan_folder(str(data), "p")
    assert not in_folder.exists() and in_cache.is_file()
    assert in_cache.parent.parent == dataset_index.paths.cache_dir()
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    assert len(scan_folder(str(data), "p").records) == 1
    assert opened == []


def _damaged_index(path):
    """Ways an index file goes bad: each must be read as no index."""
    good = path.read_bytes()
    tables = index_store.load(path)
    yield "not an archive", b"{not json"
    yield "cut short", good[:len(good) // 2]
    yield "empty", b""
    other_version = dict(np.load(path))
    other_version["version"] = np.array(index_store.INDEX_VERSION + 1)
    yield "another version", other_version
    short = dict(np.load(path))
    short["images.widths"] = short["images.widths"][:-1]
    yield "columns of different lengths", short
    offsets = dict(np.load(path))
    offsets["images.names.offsets"] = offsets["images.names.offsets"] + 1
    yield "offsets past the names", offsets
    missing = dict(np.load(path))
    del missing["images.errors.blob"]
    yield "a column missing", missing
    wrong_type = dict(np.load(path))
    wrong_type["images.sizes"] = wrong_type["images.sizes"].astype(np.float64)
    yield "a column of the wrong type", wrong_type
    order = dict(np.load(path))
    order["image_order.rows"] = np.zeros_like(order["image_order.rows"])
    yield "an image order that is no permutation", order
    assert tables is not None


@pytest.fixture
def three_images(tmp_path):
    for index in range(3):
        write_image(tmp_path / f"{index}.png", (24 + 8 * index, 16))
    return tmp_path


def test_a_corrupt_index_is_ignored_and_rebuilt(three_images, count_opens):
    index_file = three_images / INDEX_NAME
    scan_folder(str(three_images), "p")
    for what, content in list(_damaged_index(index_file)):
        if isinstance(content, bytes):
            index_file.write_bytes(content)
        else:
            with open(index_file, "wb") as handle:
                np.savez(handle, **content)
        assert index_store.load(index_file) is None, what
        count_opens.clear()
        records = scan_folder(str(three_images), "p").records
        assert [(r.width, r.height) for r in records] == [(24, 16), (32, 16), (40, 16)], what
        assert sorted(count_opens) == ["0.png", "1.png", "2.png"], what
        names = index_store.load(index_file)["images"]["names"]
        assert sorted(names.name(i) for i in range(3)) == ["0.png", "1.png", "2.png"], what


def test_an_index_of_the_old_json_format_is_rebuilt_and_removed(three_images, count_opens):
    legacy = {"version": 2, "images": {"names": ["0.png", "1.png", "2.png"], "sizes": [1, 2, 3],
                                       "mtimes": [1, 2, 3], "widths": [1, 1, 1], "heights": [1, 1, 1],
                                       "errors": [None, None, None]},
              "captions": {"names": [], "sizes": [], "mtimes": [], "texts": [], "utf8": [], "errors": []}}
    (three_images / ".scal-sdt-index.json").write_text(json.dumps(legacy))
    (three_images / INDEX_NAME).write_text(json.dumps(legacy))  # the old format under the new name
    records = scan_folder(str(three_images), "p").records
    assert [(r.width, r.height) for r in records] == [(24, 16), (32, 16), (40, 16)]
    assert sorted(count_opens) == ["0.png", "1.png", "2.png"]
    assert not (three_images / ".scal-sdt-index.json").exists()
    assert index_store.load(three_images / INDEX_NAME) is not None


def test_the_index_is_written_atomically(three_images, monkeypatch):
    scan_folder(str(three_images), "p")
    before = (three_images / INDEX_NAME).read_bytes()
    write_image(three_images / "3.png", (16, 16))

    def fail_half_way(handle, **arrays):
        handle.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_store.np, "savez", fail_half_way)
    with pytest.warns(DataWarning, match="cannot write the dataset index"):
        assert len(scan_folder(str(three_images), "p").records) == 4
    assert (three_images / INDEX_NAME).read_bytes() == before
    assert [p.name for p in three_images.iterdir() if p.name.endswith(".tmp")] == []


def test_scanning_does_not_import_torch(tmp_path):
    import subprocess

    write_image(tmp_path / "a.png", (24, 16))
    code = ("import sys; from engine.data.index import scan_folder; scan_folder(sys.argv[1], 'p'); "
            "print('torch' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == "False"


# -- packed string columns ---------------------------------------------------------------------------------

def _strings(rng, count):
    """Names that share prefixes, differ only in a late byte, are empty or non-ASCII, or longer than
    several 8-byte digits."""
    stems = ["", "a", "img_", "img_0000", "été", "x" * 23, "img_00000000"]
    return [rng.choice(stems) + "".join(rng.choice("0a.Zé") for _ in range(rng.randrange(4))) for _ in range(count)]


def test_find_equals_a_dictionary_lookup_with_and_without_hash_collisions(monkeypatch):
    import random

    from engine.data import columns
    from engine.data.columns import Packed

    rng = random.Random(5)
    for count in (0, 1, 40, 2000):
        mine, queries = _strings(rng, count), _strings(rng, count + 7)
        last_row = {name: row for row, name in enumerate(mine)}  # the last of equal strings
        expected = [last_row.get(name, -1) for name in queries]
        unique = list(dict.fromkeys(mine))
        unique_rows = {name: row for row, name in enumerate(unique)}
        assert Packed.from_names(mine).find(Packed.from_names(queries)).tolist() == expected
        assert (Packed.from_names(unique).find(Packed.from_names(queries)).tolist()
                == [unique_rows.get(name, -1) for name in queries])
    # Every string hashed alike: matches still need equal bytes.
    unique, queries = ["a", "b", "cc", "été"], ["cc", "x", "a", "", "été"]
    monkeypatch.setattr(columns, "_hashes", lambda digits: np.zeros(len(digits.lengths), dtype=np.uint64))
    assert Packed.from_names(unique).find(Packed.from_names(queries)).tolist() == [2, -1, 0, -1, 3]
    monkeypatch.setattr(Packed, "_find_by_sorting", lambda self, q: pytest.fail("sorted for unique hashes"))
    # Unique hashes (each string's row), so that "z" shares the hash of "b" though the strings differ.
    monkeypatch.setattr(columns, "_hashes", lambda digits: np.arange(len(digits.lengths), dtype=np.uint64))
    assert Packed.from_names(["a", "b", "c"]).find(Packed.from_names(["a", "z", "c", "b"])).tolist() == [0, -1, 2, -1]


def test_searchsorted_places_strings_as_bisect_does():
    import bisect
    import random

    from engine.data.columns import Packed

    rng = random.Random(11)
    for count in (0, 1, 3, 500):
        names = _strings(rng, count)
        column = Packed.from_names(names)
        order = column.sorted_rows()
        in_order = [os.fsencode(names[row]) for row in order]
        assert in_order == sorted(in_order)
        queries = _strings(rng, 300) + names[:5]
        assert (column.searchsorted(order, Packed.from_names(queries)).tolist()
                == [bisect.bisect_left(in_order, os.fsencode(query)) for query in queries])


def test_the_name_order_of_a_refreshed_table_equals_a_sort_of_its_names():
    import random

    from engine.data.columns import Packed

    rng = random.Random(3)
    stored = list(dict.fromkeys(_strings(rng, 3000)))
    stored_order = Packed.from_names(stored).sorted_rows()
    # Some names gone, some new, the rest listed in another order.
    kept = [name for name in stored if rng.random() < 0.9]
    listed = kept + [f"new{index}{rng.choice(stored)}" for index in range(60)]
    listed = list(dict.fromkeys(listed))
    rng.shuffle(listed)
    stored_row = {name: row for row, name in enumerate(stored)}
    stored_rows = np.array([stored_row.get(name, -1) for name in listed], dtype=np.int64)
    names = Packed.from_names(listed)
    assert (dataset_index._name_order(names, stored_rows, stored_order).tolist()
            == names.sorted_rows().tolist())
    nothing_stored = np.full(len(listed), -1, dtype=np.int64)
    assert (dataset_index._name_order(names, nothing_stored, np.zeros(0, dtype=np.int64)).tolist()
            == names.sorted_rows().tolist())


# -- the lazy records ---------------------------------------------------------------------------------------

def test_records_are_built_on_demand_with_the_values_of_a_list(tmp_path):
    sizes = {"a.png": (32, 16), "b.jpg": (20, 40), "c.webp": (48, 48), "d.png": (64, 8)}
    for name, size in sizes.items():
        write_image(tmp_path / name, size)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "a.txt").write_text("first, ", encoding="utf-8")
    (tmp_path / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "d.txt").write_text("fourth", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = scan_folder(str(tmp_path), "sks, {TXT_PROMPT}").records
    prefix = os.path.join(str(tmp_path), "")
    expected = [ImageRecord(prefix + "a.png", 32, 16, "sks, first"), ImageRecord(prefix + "b.jpg", 20, 40, "sks"),
                ImageRecord(prefix + "c.webp", 48, 48, "sks, third"),
                ImageRecord(prefix + "d.png", 64, 8, "sks, fourth")]
    assert len(records) == 4 and list(records) == expected and records == expected
    assert [records[i] for i in range(-4, 4)] == expected + expected
    assert all(type(r.width) is int and type(r.height) is int and type(r.path) is str for r in records)
    assert list(records[1:3]) == expected[1:3] and list(records[::-1]) == expected[::-1]
    assert list(records.take([3, 0])) == [expected[3], expected[0]]
    assert records.widths.tolist() == [32, 20, 48, 64] and records.heights.tolist() == [16, 40, 48, 8]
    assert expected[2] in records and records.index(expected[2]) == 2
    assert list(pickle.loads(pickle.dumps(records))) == expected
    with pytest.raises(IndexError):
        records[4]
    training_list = []
    training_list += records  # how the data preparation gathers the concepts' records
    assert training_list == expected
    assert [ImageRecord(prefix + "a.png", 32, 16, "sks")] != records
    with pytest.warns(DataWarning, match="bad.png"):
        assert scan_folder(str(tmp_path), "p").records != records  # the same images, other captions


def _objects_reachable(root) -> int:
    """How many distinct objects the root refers to, directly or not, leaving out classes, modules and functions."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_a_scan_keeps_no_python_object_per_image(tmp_path):
    def objects_kept(count):
        folder = tmp_path / str(count)
        folder.mkdir()
        for index in range(count):
            write_image(folder / f"{index:04d}.png", (16 + index % 7, 16))
        result = scan_folder(str(folder), "p")
        assert len(result.records) == count
        return _objects_reachable(result)

    # What the result holds does not grow per image. The reference graph is counted rather than the allocator's
    # blocks, which the process's other threads change meanwhile.
    assert objects_kept(1000) - objects_kept(100) < 20


class _Tokenizer:
    pad_token_id = 0
    model_max_length = 77

    def __call__(self, text, truncation=True, max_length=77):
        return type("Tokens", (), {"input_ids": [1, len(text), 2]})()


def test_prepared_data_keeps_the_records_lazy_with_the_values_of_lists(tmp_path):
    from engine.data.prepare import prepare_data
    from engine.data.records import LazyRecords
    from engine.testing import tiny_config

    small, large = tmp_path / "small", tmp_path / "large"
    for folder, sizes in ((small, [(64, 64), (64, 32)]), (large, [(32, 64), (4, 64), (64, 64), (96, 64)])):
        folder.mkdir()
        for index, size in enumerate(sizes):
            write_image(folder / f"{index}.png", size)
    (large / "2.txt").write_text("a caption", encoding="utf-8")
    concepts = [{"instance_set": {"path": str(small), "prompt": "sks", "repeats": 2}},
                {"instance_set": {"path": str(large), "prompt": "toy, {TXT_PROMPT}"}}]

    def prepared(**overrides):
        config = cfg.from_dict(tiny_config(tmp_path / "run", **{
            "prior_preservation.enabled": False, "aspect_ratio_bucket.enabled": True, "data.concepts": concepts,
            **overrides}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config, prepare_data(config, _Tokenizer(), seed=0)

    config, data = prepared()
    # What the records would be as lists: both scans one after the other, bucketed (1.png of `large` is
    # too small), each kept image `repeats` times in a row.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = list(scan_folder(str(small), "sks").records) + list(scan_folder(str(large), "toy, {TXT_PROMPT}").records)
        plan = plan_buckets(config, eager)
    repeats = [2, 2, 1, 1, 1, 1]
    expected = [eager[i] for i in plan.indices for _ in range(repeats[i])]
    buckets = [bucket for i, bucket in zip(plan.indices, plan.assignments) for _ in range(repeats[i])]
    instances = data.dataset.instances
    assert isinstance(instances, LazyRecords) and not isinstance(instances, list)
    assert len(instances) == len(expected) == 7 and data.images == 5
    assert [instances[i] for i in range(-7, 7)] == expected + expected and list(instances) == expected
    assert expected[6] == ImageRecord(str(large / "3.png"), 96, 64, "toy")
    assert expected[5] == ImageRecord(str(large / "2.png"), 64, 64, "toy, a caption")
    assert data.dataset.instance_buckets == buckets and data.dataset.instance_groups == [0, 0, 0, 0, 1, 1, 1]
    width, height = data.bucket_sizes[buckets[6]]
    assert tuple(data.dataset[6]["instance"]["pixel_values"].shape) == (3, height, width)

    # Held out by validation.split: lazy too; with the training and the skipped images, all of them.
    _, split = prepared(**{"validation.split": 0.5, "validation.every_n_steps": 5})
    assert isinstance(split.held_out, LazyRecords) and len(split.held_out) == 3  # 1 of 2 and 2 of 4 images
    trained = {record.path for record in split.dataset.instances}
    held = {record.path for record in split.held_out}
    assert trained.isdisjoint(held) and len(held) == 3
    assert trained | held | {path for path, _ in split.skipped} == {record.path for record in eager}


# -- the pool of readers ------------------------------------------------------------------------------------

def _mixed_folder(folder):
    folder.mkdir()
    for index in range(40):
        write_image(folder / f"img{index:02d}.png", (16 + index, 64 - index))
        if index % 3:
            (folder / f"img{index:02d}.txt").write_text(f"caption {index}", encoding="utf-8")
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(folder / "rotated.jpg", (40, 20), "JPEG", exif=exif)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    data = (folder / "img00.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[:-12])
    (folder / "latin1.png").write_bytes(data)
    (folder / "latin1.txt").write_bytes("crème".encode("latin-1"))
    return folder


def test_a_scan_by_two_processes_equals_one_by_this_process(tmp_path, count_opens):
    folder = _mixed_folder(tmp_path / "data")

    def scan(processes):
        for location in dataset_index.index_locations(folder):
            location.unlink(missing_ok=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = scan_folder(str(folder), "x, {TXT_PROMPT}", processes=processes)
        tables = index_store.load(folder / INDEX_NAME)
        return list(result.records), result.skipped, sorted(str(w.message) for w in caught), tables

    records, skipped, messages, tables = scan(1)
    assert len(count_opens) == 44
    count_opens.clear()
    pooled = scan(2)
    assert count_opens == []  # every header was read in the pool's processes
    assert pooled[:3] == (records, skipped, messages)
    for table, columns in tables.items():
        for name, column in columns.items():
            other = pooled[3][table][name]
            assert other.equals(column) if hasattr(column, "equals") else np.array_equal(other, column), name
    assert {os.path.basename(p) for p, _ in skipped} == {"broken.png", "truncated.png"}
    assert (records[-1].width, records[-1].height) == (20, 40)  # rotated.jpg


def test_worker_processes_start_from_any_folder_and_report_failures(tmp_path, monkeypatch):
    from engine.data.worker_pool import WorkerPool

    monkeypatch.chdir(tmp_path)  # the workers still find the engine
    with WorkerPool(2) as pool:
        calls = [(f"/data/{index}.png",) for index in range(20)]
        assert pool.map(os.path.basename, calls) == [f"{index}.png" for index in range(20)]
        with pytest.raises(RuntimeError, match="FileNotFoundError"):
            pool.map(os.stat, [(str(tmp_path / "missing"),)])
        assert pool.map(os.path.dirname, [("/a/b",)]) == ["/a"]  # a failed call leaves its worker serving


# -- vectorised bucket assignment -------------------------------------------------------------------------

def _per_image_plan(config, records, sizes):
    """The rule applied image by image: nearest log aspect, the larger bucket on ties (then the earlier);
    too small or too far images are skipped."""
    bucket_logs = np.log([w / h for w, h in sizes])
    smallest_side = min(min(s) for s in sizes)
    max_error = config.aspect_ratio_bucket.max_aspect_error
    kept, assignments, skipped = [], [], []
    for index, record in enumerate(records):
        image_log = np.log(np.array([record.width / record.height]))[0]
        errors = [abs(image_log - bucket_log) for bucket_log in bucket_logs]
        bucket = min(range(len(sizes)), key=lambda b: (errors[b], -sizes[b][0] * sizes[b][1], b))
        if min(record.width, record.height) * MAX_UPSCALE < smallest_side:
            skipped.append((record.path, "too small"))
        elif errors[bucket] >= max_error:
            skipped.append((record.path, f"of {errors[bucket]:.2f}"))
        else:
            kept.append(index)
            assignments.append(bucket)
    return kept, assignments, skipped


@pytest.mark.parametrize("resolution, arb", [(512, {}), (64, {}), (512, {"max_aspect_error": 0.1}),
                                             (64, {"manual": {"base_res": [64, 48], "max_size": 4096,
                                                              "dim_range": [32, 96], "divisor": 8}})])
def test_vectorised_buckets_equal_the_per_image_rule(resolution, arb):
    config = cfg.load(base={"data": {"resolution": resolution}, "aspect_ratio_bucket": {"enabled": True, **arb}})
    sizes = bucket_sizes(config)
    rng = np.random.default_rng(resolution + len(arb))
    sides = rng.integers(1, 3000, size=(3000, 2)).tolist()
    # Exact aspects of buckets, squares and halfway cases, where ties are decided.
    sides += [list(s) for s in sizes] + [[w * 3, h * 3] for w, h in sizes] + [[100, 100], [200, 100], [100, 200]]
    records = [ImageRecord(f"/d/{i}.png", w, h, "p") for i, (w, h) in enumerate(sides)]
    kept, assignments, skipped = _per_image_plan(config, records, sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_buckets(config, records)
    assert plan.indices == kept and plan.assignments == assignments
    assert plan.kept == [records[i] for i in kept]
    assert [path for path, _ in plan.skipped] == [path for path, _ in skipped]
    for (_, reason), (_, expected) in zip(plan.skipped, skipped):
        assert expected in reason
    assert len(caught) == len(skipped)


def test_buckets_of_lazy_records_equal_those_of_a_list(tmp_path):
    for index, size in enumerate([(64, 64), (128, 64), (64, 130), (4, 64), (300, 20), (90, 60)]):
        write_image(tmp_path / f"{index}.png", size)
    config = cfg.load(base={"data": {"resolution": 64}, "aspect_ratio_bucket": {"enabled": True}})
    records = scan_folder(str(tmp_path), "p").records
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy, eager = plan_buckets(config, records), plan_buckets(config, list(records))
    assert type(lazy.kept) is not list and list(lazy.kept) == eager.kept
    assert (lazy.indices, lazy.assignments, lazy.skipped) == (eager.indices, eager.assignments, eager.skipped)
    assert len(lazy.skipped) == 2

