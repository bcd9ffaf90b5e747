"""The whole loop of a rented GPU through the real page in Chromium: a zip of images in, captions by a tiny
captioner, one caption edited, two LoRA runs queued one behind the other, and the adapter file downloaded."""
import re
import time
import zipfile
from pathlib import Path

import pytest

from scal_gui import results
from scal_gui.testing import CHROMIUM, app_server, open_tab

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
WINDOW = {"width": 1400, "height": 1000}
TRIGGER = "sks"
STEPS = 4


def type_into(page, field: str, text: str) -> None:
    box = page.locator(f"#{field} input, #{field} textarea").first
    box.fill(text)
    box.press("Tab")


def newest_adapter(run: Path) -> Path:
    return sorted(run.glob(f"checkpoints/step-*/{results.ADAPTER_FILE}"))[-1]


@needs_chromium
def test_upload_caption_edit_queue_two_runs_and_download_the_adapter(browser, sample_data, class_images, tmp_path):
    from playwright.sync_api import expect

    from engine.models.tiny_captioners import make_tiny_captioner

    captioner = make_tiny_captioner(tmp_path / "wd14", arch="wd14")
    images = sorted(p for p in (sample_data / "instance").glob("*.png"))
    bundle = tmp_path / "subject.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        for path in images:
            archive.write(path, f"photos/{path.name}")
    data, output = tmp_path / "data" / "datasets", tmp_path / "output"
    dataset = data / "subject"

    with app_server("--output-dir", str(output), "--data-dir", str(data)) as url:
        page = open_tab(browser, url, "Dataset", WINDOW)
        # 1. the zip, uploaded into a named dataset
        page.locator("#dataset-upload input[type=file]").set_input_files(str(bundle))
        # the file's row (name and extension are separate elements, sometimes read with a space between)
        expect(page.locator("#dataset-upload")).to_contain_text(re.compile(r"subject\s*\.zip"))
        type_into(page, "dataset-name", "subject")
        page.click("#dataset-add-button")
        expect(page.locator("#dataset-upload-message")).to_contain_text(f"subject: added {len(images)} files",
                                                                         timeout=60_000)
        expect(page.locator("#caption-message")).to_contain_text(f"subject: {len(images)} images, 0 captioned")

        # 2. captioned by the tiny tagger, the trigger word first
        type_into(page, "caption-model", str(captioner))
        type_into(page, "trigger-word", TRIGGER)
        page.click("#caption-auto")
        expect(page.locator("#caption-status")).to_contain_text("Finished", timeout=120_000)
        expect(page.locator("#caption-message")).to_contain_text(
            f"subject: {len(images)} images, {len(images)} captioned")
        captions = {p.name: p.with_suffix(".txt").read_text().strip() for p in sorted(dataset.glob("*.png"))}
        assert len(captions) == len(images)
        assert all(text.startswith(f"{TRIGGER}, ") and len(text) > len(TRIGGER) + 2 for text in captions.values())

        # 3. one caption edited by hand
        page.locator("#caption-gallery img").first.click()
        first = next(iter(captions))
        expect(page.locator("#caption-text textarea")).to_have_value(captions[first])
        page.locator("#caption-text textarea").fill(f"{TRIGGER}, a toy on a table")
        page.click("#caption-save")
        expect(page.locator("#caption-message")).to_contain_text(f"Saved the caption of {first}")
        assert (dataset / first).with_suffix(".txt").read_text().strip() == f"{TRIGGER}, a toy on a table"

        # 4. two tiny LoRA runs over the dataset, queued: the second starts on its own when the first ends
        page.get_by_role("tab", name="Train").click()
        page.locator("#preset input").click()
        page.get_by_role("option", name="tiny-lora-cpu").click()
        expect(page.locator("#preset-description")).to_contain_text("Tiny offline LoRA demo")
        # the preset's own values land first, or they would overwrite the steps typed here
        expect(page.locator("#field-trainer-max-steps input")).to_have_value("40")
        type_into(page, "field-trainer-max-steps", str(STEPS))
        page.get_by_role("tab", name="Dataset").click()  # the instance folder is a Dataset tab field
        type_into(page, "field-data-concepts-0-instance-set-path", str(dataset))
        page.get_by_role("tab", name="Train").click()
        page.click("#queue-button")
        expect(page.locator("#job-message")).to_contain_text("Started")
        page.click("#queue-button")
        expect(page.locator("#job-message")).to_contain_text("Queued")
        page.get_by_role("tab", name="Queue").click()
        table = page.locator("#queue-table")
        # the captioning and both runs finished (the rows' states, as the table draws them)
        deadline = time.monotonic() + 240
        while table.inner_text().count("finished") < 3 and time.monotonic() < deadline:
            page.wait_for_timeout(1000)
        assert table.inner_text().count("finished") == 3, table.inner_text()
        runs = sorted(p.parent for p in output.glob("*/*/config.yaml"))
        assert len(runs) == 2
        for run in runs:
            assert f"path: {dataset}" in (run / "config.yaml").read_text()
            assert newest_adapter(run).parent.name == f"step-{STEPS:08d}"

        # 5. the first run's adapter file, downloaded through the page
        page.get_by_role("tab", name="Convert").click()
        page.get_by_text("Results: download a run's files").click()
        page.click("#results-refresh")
        page.locator("#results-run input").click()
        page.get_by_role("option", name=f"{runs[0].parent.name}/{runs[0].name}").click()
        # the buttons serve the chosen run's files once the page has shown it (the newest run's until then)
        expect(page.locator("#results-message")).to_contain_text(f"{runs[0].parent.name}/{runs[0].name}")
        button = page.locator("#download-adapter")
        expect(button).to_be_visible()
        with page.expect_download() as download_info:
            button.click()
        saved = tmp_path / "downloaded.safetensors"
        download_info.value.save_as(saved)
        assert saved.read_bytes() == newest_adapter(runs[0]).read_bytes()
        page.close()
