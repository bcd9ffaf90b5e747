"""engine.data.archive: hostile archives are refused, naming the member, with nothing written anywhere;
good ones unpack their images, captions and masks, flattened, and skip the rest."""
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from engine.data.archive import Limits, dataset_kind, extract, name_problem
from engine.errors import UserError

PNG = (b"\x89PNG\r\n\x1a\n" + bytes(range(256))) * 2   # bytes only: archive does not decode images


def write_zip(path: Path, members, raw_patch=None):
    """members: (name, data) pairs or ZipInfo/data pairs; raw_patch: (old, new) bytes swapped in the written
    file, for names zipfile will not write (a NUL, bytes that are not UTF-8)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    if raw_patch:
        old, new = raw_patch
        assert len(old) == len(new)
        content = path.read_bytes()
        assert content.count(old) == 2  # the local header and the central directory
        path.write_bytes(content.replace(old, new))
    return path


def write_tar(path: Path, members, mode="w:gz"):
    """members: TarInfo or (name, data) pairs."""
    with tarfile.open(path, mode) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def tar_entry(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def zip_symlink():
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def zip_fifo():
    info = zipfile.ZipInfo("pipe.png")
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info


def noise(size):
    return os.urandom(size)


# (id, archive file name, builder(path) -> path, the member the refusal must name)
HOSTILE = [
    ("zip-traversal", "a.zip", lambda p: write_zip(p, [("ok.png", PNG), ("../x.png", PNG)]), "../x.png"),
    ("zip-deep-traversal", "a.zip", lambda p: write_zip(p, [("set/../../x.png", PNG)]), "set/../../x.png"),
    ("zip-backslash-traversal", "a.zip", lambda p: write_zip(p, [("set\\..\\..\\x.png", PNG)]), "set\\..\\..\\x.png"),
    ("zip-absolute", "a.zip", lambda p: write_zip(p, [("/etc/x.png", PNG)]), "/etc/x.png"),
    ("zip-drive-letter", "a.zip", lambda p: write_zip(p, [("C:\\x.png", PNG)]), "C:\\x.png"),
    ("zip-symlink", "a.zip", lambda p: write_zip(p, [(zip_symlink(), "/etc/passwd")]), "link.png"),
    ("zip-fifo-mode", "a.zip", lambda p: write_zip(p, [(zip_fifo(), "")]), "pipe.png"),
    ("zip-too-many-files", "a.zip", lambda p: write_zip(p, [(f"{i}.txt", "c") for i in range(9)]), "8.txt"),
    ("zip-too-many-bytes", "a.zip", lambda p: write_zip(p, [("a.png", noise(3000)), ("b.png", noise(3000))]), "b.png"),
    ("zip-bomb", "a.zip", lambda p: write_zip(p, [("ok.txt", "c"), ("bomb.png", bytes(8 << 20))]), "bomb.png"),
    ("zip-case-duplicate", "a.zip", lambda p: write_zip(p, [("Cat.png", PNG), ("cat.PNG", PNG)]), "cat.PNG"),
    ("zip-flattened-duplicate", "a.zip", lambda p: write_zip(p, [("a/x.png", PNG), ("b/x.png", PNG)]), "b/x.png"),
    ("zip-nul-in-name", "a.zip", lambda p: write_zip(p, [("nuZQZl.png", PNG)], (b"ZQZ", b"a\x00b")), "nua\x00bl.png"),
    ("zip-not-utf8", "a.zip", lambda p: write_zip(p, [("bad-ZQ.png", PNG)], (b"ZQ", b"\xff\xfe")), "bad-"),
    ("tar-traversal", "a.tar.gz", lambda p: write_tar(p, [("../x.png", PNG)]), "../x.png"),
    ("tar-absolute", "a.tar", lambda p: write_tar(p, [("/etc/x.png", PNG)], "w"), "/etc/x.png"),
    ("tar-drive-letter", "a.tar.bz2", lambda p: write_tar(p, [("C:\\x.png", PNG)], "w:bz2"), "C:\\x.png"),
    ("tar-symlink", "a.tar.gz", lambda p: write_tar(p, [tar_entry("x.png", tarfile.SYMTYPE, "/etc/passwd")]), "x.png"),
    ("tar-hardlink", "a.tar.gz", lambda p: write_tar(p, [("a.png", PNG), tar_entry("b.png", tarfile.LNKTYPE, "a.png")]),
     "b.png"),
    ("tar-fifo", "a.tar.xz", lambda p: write_tar(p, [tar_entry("pipe.png", tarfile.FIFOTYPE)], "w:xz"), "pipe.png"),
    ("tar-char-device", "a.tar.gz", lambda p: write_tar(p, [tar_entry("null.png", tarfile.CHRTYPE)]), "null.png"),
    ("tar-block-device", "a.tar.gz", lambda p: write_tar(p, [tar_entry("sda.png", tarfile.BLKTYPE)]), "sda.png"),
    ("tar-too-many-files", "a.tar.gz", lambda p: write_tar(p, [(f"{i}.txt", b"c") for i in range(9)]), "8.txt"),
    ("tar-too-many-bytes", "a.tar", lambda p: write_tar(p, [("a.png", noise(3000)), ("b.png", noise(3000))], "w"),
     "b.png"),
    ("tar-gz-bomb", "a.tar.gz", lambda p: write_tar(p, [("bomb.png", bytes(8 << 20))]), "bomb.png"),
    ("tar-case-duplicate", "a.tar.gz", lambda p: write_tar(p, [("Cat.png", PNG), ("cat.PNG", PNG)]), "cat.PNG"),
]
HOSTILE_IDS = [f"{i + 1:02d}of{len(HOSTILE)}-{case[0]}" for i, case in enumerate(HOSTILE)]


@pytest.mark.parametrize("case", HOSTILE, ids=HOSTILE_IDS)
def test_each_of_26_hostile_archives_is_refused_naming_the_member_and_writes_nothing(case, tmp_path):
    _, file_name, build, member = case
    source, parent = tmp_path / "source", tmp_path / "datasets"
    source.mkdir()
    parent.mkdir()
    archive = build(source / file_name)
    limits = Limits(max_files=8, max_bytes=4096) if "too-many" in case[0] else Limits()
    with pytest.raises(UserError) as refused:
        extract(archive, parent / "new", limits)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{file_name}: refused member ")
    assert member in message or repr(member)[1:-1] in message, message
    assert os.listdir(parent) == []
    assert sorted(os.listdir(source)) == [file_name]


def test_the_hostile_corpus_has_26_cases():
    assert len(HOSTILE) == 26


def test_a_refused_archive_leaves_an_existing_dataset_as_it_was(tmp_path):
    dataset = tmp_path / "datasets" / "cats"
    dataset.mkdir(parents=True)
    (dataset / "a.png").write_bytes(PNG)
    archive = write_zip(tmp_path / "more.zip", [("b.png", PNG), ("b.txt", "a cat"), ("../c.png", PNG)])
    with pytest.raises(UserError, match=r"'\.\./c\.png'"):
        extract(archive, dataset)
    assert os.listdir(dataset) == ["a.png"] and os.listdir(dataset.parent) == ["cats"]
    clash = write_zip(tmp_path / "clash.zip", [("b.png", PNG), ("A.PNG", PNG)])
    with pytest.raises(UserError, match="'A.PNG' is already taken"):
        extract(clash, dataset)
    assert os.listdir(dataset) == ["a.png"] and os.listdir(dataset.parent) == ["cats"]


GOOD = [("set/", None), ("set/a.png", PNG), ("set/a.txt", b"a cat on a mat"), ("set/a.mask.png", PNG[::-1]),
        ("set/b.JPG", PNG + b"jpg"), ("set/b.txt", b"a dog"), ("set/tool.exe", b"MZ" + bytes(100)),
        ("__MACOSX/set/._a.png", b"fork"), ("set/.DS_Store", b"x")]
WRITTEN = {"a.png": PNG, "a.txt": b"a cat on a mat", "a.mask.png": PNG[::-1], "b.JPG": PNG + b"jpg",
           "b.txt": b"a dog"}
SKIPPED = ["set/tool.exe", "__MACOSX/set/._a.png", "set/.DS_Store"]


def test_a_good_zip_unpacks_images_captions_and_masks_and_skips_the_rest(tmp_path):
    archive = write_zip(tmp_path / "good.zip", [(name, data if data is not None else b"") for name, data in GOOD
                                                 if not name.endswith("/")])
    summary = extract(archive, tmp_path / "out" / "cats")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "cats").iterdir()} == WRITTEN
    assert sorted(summary.extracted) == sorted(WRITTEN) and sorted(summary.skipped) == sorted(SKIPPED)
    assert os.listdir(tmp_path / "out") == ["cats"]
    assert "5 files added, 3 skipped" in summary.describe()


def test_a_good_tar_gz_unpacks_into_an_existing_dataset(tmp_path):
    members = []
    for name, data in GOOD:
        if data is None:
            members.append(tar_entry(name.rstrip("/"), tarfile.DIRTYPE))
        else:
            members.append((name, data))
    archive = write_tar(tmp_path / "good.tar.gz", members)
    dataset = tmp_path / "out" / "cats"
    dataset.mkdir(parents=True)
    (dataset / "old.png").write_bytes(PNG)
    summary = extract(archive, dataset)
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == {**WRITTEN, "old.png": PNG}
    assert sorted(summary.skipped) == sorted(SKIPPED)
    assert os.listdir(tmp_path / "out") == ["cats"]


def test_small_text_members_that_compress_well_are_not_bombs(tmp_path):
    archive = write_zip(tmp_path / "captions.zip", [(f"{i}.txt", "a photo of a cat " * 500) for i in range(3)])
    assert len(extract(archive, tmp_path / "out").extracted) == 3


def test_names_and_kinds():
    assert [dataset_kind(n) for n in ("a.PNG", "a.mask.png", "a.txt", "a.exe", ".a.png", "a.webp")] == \
        ["image", "mask", "caption", None, None, "image"]
    assert name_problem("set/a.png") is None and name_problem("a..b.png") is None
    assert name_problem("d:x.png") == "a drive letter" and name_problem("\\\\server\\x.png") == "an absolute path"


def test_damaged_archives_are_refused_in_one_line(tmp_path):
    parent = tmp_path / "datasets"
    parent.mkdir()
    good = write_zip(tmp_path / "x.zip", [("a.png", PNG)])
    flagged = tmp_path / "flagged.zip"   # the UTF-8 flag set on a name that is not UTF-8
    with zipfile.ZipFile(flagged, "w") as archive:
        archive.writestr("bad-é.png", PNG)
    content = flagged.read_bytes()
    flagged.write_bytes(content.replace("é".encode(), b"\xff\xfe"))
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(write_tar(tmp_path / "whole.tar.gz", [("a.png", os.urandom(50_000))]).read_bytes()[:20_000])
    garbage = tmp_path / "junk.tar"
    garbage.write_bytes(b"not a tar" * 100)
    (tmp_path / "y.zip").write_bytes(good.read_bytes()[:30])
    for archive in (flagged, truncated, garbage, tmp_path / "y.zip"):
        with pytest.raises(UserError) as refused:
            extract(archive, parent / "new")
        assert str(refused.value).startswith(f"{archive.name}: ") and "\n" not in str(refused.value)
        assert os.listdir(parent) == []
    with pytest.raises(UserError, match="not an archive"):
        extract(tmp_path / "x.rar", parent / "new")
