"""Datasets uploaded through the page (scal_gui.datasets): names, counts, the size limit, and one upload of a
zip through the real page in Chromium into a new dataset."""
import os
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.data.archive import Limits, dataset_kind
from engine.errors import UserError
from scal_gui import datasets
from scal_gui.testing import CHROMIUM, app_server, open_tab

VIEWPORT = {"width": 1280, "height": 1000}
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def files(folder: Path, **named) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in named.items():
        path = folder / name.replace("__", ".")
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        paths.append(path)
    return paths


BAD_NAMES = ["", " ", "a b", "../x", "x/y", "a\\b", ".hidden", "-flag", "a.b", "C:", "ä", "x" * 65, "a\x00"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[f"{i + 1:02d}of{len(BAD_NAMES)}" for i in range(len(BAD_NAMES))])
def test_each_of_13_bad_dataset_names_is_refused_and_creates_nothing(name, tmp_path):
    upload = files(tmp_path / "up", a__png=PNG)
    data = tmp_path / "data"
    with pytest.raises(UserError, match="dataset name"):
        datasets.add_files(data, name, upload)
    assert not data.exists() and sorted(os.listdir(tmp_path)) == ["up"]


def test_good_names_are_kept():
    assert [datasets.check_name(n) for n in ("cats", "my-set_2", " Dogs ", "9")] == ["cats", "my-set_2", "Dogs", "9"]


def test_uploads_are_listed_with_image_and_caption_counts(tmp_path):
    data = tmp_path / "data"
    assert datasets.list_datasets(data) == []
    up = tmp_path / "up"
    loose = files(up, a__png=PNG, a__txt="a cat", b__jpg=PNG, b__mask__png=PNG, notes__exe="MZ")
    with zipfile.ZipFile(up / "more.zip", "w") as archive:
        archive.writestr("set/c.webp", PNG)
        archive.writestr("set/c.txt", "a dog")
        archive.writestr("set/readme.md", "hi")
    report = datasets.add_files(data, "pets", [*loose, up / "more.zip"])
    assert sorted(report.added) == ["a.png", "a.txt", "b.jpg", "b.mask.png", "c.txt", "c.webp"]
    assert report.skipped == ["notes.exe", "more.zip:set/readme.md"] and report.refused == []
    assert report.message().startswith("pets: added 6 files, skipped 2")
    (info,) = datasets.list_datasets(data)
    assert (info.name, info.images, info.captioned, info.label()) == ("pets", 3, 2, "pets (3 images, 2 captioned)")

    # a second upload: a clash in case, a hostile archive and a bad file name are refused one by one
    again = files(tmp_path / "up2", A__PNG=PNG, d__png=PNG)
    with zipfile.ZipFile(tmp_path / "up2" / "evil.zip", "w") as archive:
        archive.writestr("e.png", PNG)
        archive.writestr("../escape.png", PNG)
    report = datasets.add_files(data, "pets", [*again, tmp_path / "up2" / "evil.zip", ("../x.png", again[1])])
    assert report.added == ["d.png"] and len(report.refused) == 3
    assert "'A.PNG'" in report.refused[0] and "'../escape.png'" in report.refused[1]
    assert "'../x.png'" in report.refused[2]
    assert sorted(os.listdir(data / "pets")) == ["a.png", "a.txt", "b.jpg", "b.mask.png", "c.txt", "c.webp", "d.png"]
    assert os.listdir(data) == ["pets"]
    assert [(i.name, i.images) for i in datasets.list_datasets(data)] == [("pets", 4)]


def test_an_archive_uploaded_under_a_temporary_name_is_read_by_its_own_name(tmp_path):
    stored = tmp_path / "upload-1234"
    with zipfile.ZipFile(stored, "w") as archive:
        archive.writestr("x.png", PNG)
    report = datasets.add_files(tmp_path / "data", "set", [("photos.zip", stored)])
    assert report.added == ["x.png"] and sorted(os.listdir(tmp_path)) == ["data", "upload-1234"]


def test_the_upload_size_limit_refuses_the_whole_upload(tmp_path):
    upload = files(tmp_path / "up", a__png=PNG * 10, b__png=PNG * 10)
    data = tmp_path / "data"
    with pytest.raises(UserError, match="over the limit of 1000 bytes"):
        datasets.add_files(data, "big", upload, max_upload_bytes=1000)
    assert not data.exists()
    report = datasets.add_files(data, "big", upload, max_upload_bytes=len(PNG) * 20)
    assert len(report.added) == 2


def test_an_upload_with_nothing_added_leaves_no_dataset(tmp_path):
    upload = files(tmp_path / "up", tool__exe="MZ")
    report = datasets.add_files(tmp_path / "data", "empty", upload, limits=Limits())
    assert report.added == [] and report.skipped == ["tool.exe"]
    assert datasets.list_datasets(tmp_path / "data") == []


# -- the page ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(sample_data, tmp_path_factory):
    data = tmp_path_factory.mktemp("app-data") / "datasets"
    output = tmp_path_factory.mktemp("app-output")
    with app_server("--output-dir", str(output), "--data-dir", str(data)) as url:
        yield SimpleNamespace(url=url, data=data)


@needs_chromium
def test_a_zip_of_the_sample_images_uploaded_on_the_page_becomes_a_listed_dataset(app, browser, sample_data,
                                                                                  tmp_path):
    from playwright.sync_api import expect

    finetune = sample_data / "finetune"
    images = [p for p in finetune.glob("*.png") if not p.name.endswith(".mask.png")]
    captioned = sum(p.with_suffix(".txt").exists() for p in images)
    assert len(images) >= 10
    label = f"shapes ({len(images)} images, {captioned} captioned)"
    bundle = tmp_path / "shapes.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        for path in sorted(finetune.iterdir()):
            archive.write(path, f"finetune/{path.name}")

    page = open_tab(browser, app.url, "Dataset", VIEWPORT)
    page.locator("#dataset-upload input[type=file]").set_input_files(str(bundle))
    # once uploaded, the file list shows the name and its extension apart ("shapes .zip")
    expect(page.locator("#dataset-upload")).to_contain_text(re.compile(r"shapes\s*\.zip"))
    name = page.locator("#dataset-name textarea, #dataset-name input").first
    name.fill("../shapes")
    page.click("#dataset-add-button")
    expect(page.locator("#dataset-upload-message")).to_contain_text("Error: dataset name '../shapes'")
    assert not app.data.exists()
    name.fill("shapes")
    page.click("#dataset-add-button")
    # what a dataset keeps of the folder (other tests of the session may leave other files in it)
    kept = sorted(p.name for p in finetune.iterdir() if dataset_kind(p.name))
    expect(page.locator("#dataset-upload-message")).to_contain_text(f"shapes: added {len(kept)} files",
                                                                    timeout=60_000)
    expect(page.locator("#dataset-choice input")).to_have_value(label)
    assert sorted(os.listdir(app.data / "shapes")) == kept

    # choosing it in the list previews its buckets
    page.locator("#dataset-choice input").click()
    page.get_by_role("option", name=label).click()
    expect(page.locator("#bucket-message")).to_contain_text(f"{len(images)} images in ", timeout=60_000)
    path_field = page.locator("#field-data-concepts-0-instance-set-path input")
    expect(path_field).to_have_value(str(app.data / "shapes"))
    page.close()


def test_the_upload_area_accepts_every_archive_kind_and_the_flag_names_the_data_folder(tmp_path, monkeypatch):
    from gradio_client.utils import is_valid_file

    from engine.data.archive import ARCHIVE_SUFFIXES, IMAGE_EXTENSIONS
    from scal_gui import server, tab_dataset

    names = [f"x{suffix}" for suffix in (*ARCHIVE_SUFFIXES, *IMAGE_EXTENSIONS, ".txt", ".mask.png", ".JPG")]
    assert all(is_valid_file(name, tab_dataset.UPLOAD_TYPES) for name in names)
    assert not is_valid_file("x.exe", tab_dataset.UPLOAD_TYPES)
    assert server.build_parser().parse_args(["--data-dir", str(tmp_path)]).data_dir == str(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    assert datasets.default_data_dir() == tmp_path / "share" / "scal-sdt" / "datasets"
