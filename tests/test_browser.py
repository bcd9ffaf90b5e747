"""The app in a real browser (Debian's Chromium driven by Playwright) and through its API (gradio_client).

One app server serves the whole module, started as `python app.py` with the demo cache and the output
folder in temporary directories. Screenshots are kept in test-artifacts/; with SCAL_DOCS_SCREENSHOT=1 the
Train tab during the demo run is also written to docs/train-tab.png for the README.
"""
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT
from scal_gui import configs
from scal_gui.testing import CHROMIUM, app_server, open_tab

ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "train-tab.png"
DOCS_LIMIT = 300_000
VIEWPORT = {"width": 1280, "height": 1000}
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")

# Points of the longest line in the loss plot (vega draws each series as one SVG path of M/L commands).
LOSS_POINTS_JS = """() => Math.max(0, ...Array.from(
    document.querySelectorAll('#loss-plot svg path[aria-roledescription="line mark"]'),
    p => (p.getAttribute('d') || '').split('L').length))"""


@pytest.fixture(scope="module")
def app(class_images, tmp_path_factory):
    output = tmp_path_factory.mktemp("app-output")
    with app_server("--output-dir", str(output)) as url:
        yield SimpleNamespace(url=url, output=output)


def open_page(browser, app, tab):
    return open_tab(browser, app.url, tab, VIEWPORT)


def run_folders(output: Path) -> list[Path]:
    return sorted(p.parent for p in output.glob("*/*/config.yaml"))


def shoot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def save_docs_screenshot(source: Path) -> None:
    from PIL import Image

    image = Image.open(source).convert("RGB")
    # A flat UI quantizes to a palette without visible loss, and the README wants a small file.
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(DOCS_SCREENSHOT, optimize=True)
    assert DOCS_SCREENSHOT.stat().st_size < DOCS_LIMIT


@needs_chromium
def test_an_invalid_config_shows_its_error_and_starts_nothing(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Train")
    batch = page.locator("#field-batch-size input")
    batch.fill("0")
    batch.press("Tab")
    expect(page.locator("#config-check")).to_contain_text("batch_size")
    page.click("#start-button")
    expect(page.locator("#job-message")).to_contain_text("Not started: config key 'batch_size'")
    shoot(page, "invalid-config.png")
    assert run_folders(app.output) == []
    page.close()


@needs_chromium
def test_train_tab_runs_shows_progress_and_stops(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Train")
    expect(page.locator("#preset input")).to_have_value("tiny-demo-cpu")
    expect(page.locator("#preset-description")).to_contain_text("Tiny offline demo")
    # more steps than the preset's 40, which a quiet machine trains before the test reaches Stop
    steps = page.locator("#field-trainer-max-steps input")
    steps.fill("400")
    steps.press("Tab")
    expect(page.locator("#config-check")).to_contain_text("The config is valid")
    page.click("#start-button")
    expect(page.locator("#job-message")).to_contain_text("Started", timeout=60_000)
    page.wait_for_function(f"({LOSS_POINTS_JS})() >= 2", timeout=120_000)
    seen = page.evaluate(LOSS_POINTS_JS)

    # The run belongs to the server, not to the browser tab: a new tab finds it still going.
    page.close()
    page = open_page(browser, app, "Train")
    expect(page.locator("#train-status")).to_contain_text("Running")
    # and its form shows the run's config (400 steps), not the preset's 40
    expect(page.locator("#preset-description")).to_contain_text("Showing the config of the run in progress")
    expect(page.locator("#field-trainer-max-steps input")).to_have_value("400")
    page.wait_for_function(f"({LOSS_POINTS_JS})() > {seen}", timeout=60_000)
    expect(page.locator("#sample-gallery img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step \d+ / 400 · epoch \d+ · [\d.]+ it/s"))
    screenshot = shoot(page, "train-running.png")
    if os.environ.get("SCAL_DOCS_SCREENSHOT") == "1":
        save_docs_screenshot(screenshot)

    page.click("#stop-button")
    expect(page.locator("#train-status")).to_contain_text("Stopped", timeout=120_000)
    (run,) = run_folders(app.output)
    expect(page.locator("#resume-run input")).to_have_value(re.compile(re.escape(run.name)))
    expect(page.locator("#train-log textarea")).to_have_value(re.compile(r"checkpoint: .*step-\d+"))
    shoot(page, "train-stopped.png")
    page.close()


@needs_chromium
def test_class_images_tab_generates_into_the_class_folder(app, browser, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Dataset")
    folder = page.locator("#field-data-concepts-0-class-set-path input")
    folder.fill(str(tmp_path / "class"))
    folder.press("Tab")
    page.get_by_role("tab", name="Class images").click()
    wanted = page.locator("#field-data-concepts-0-class-set-auto-generate-num-target input")
    wanted.fill("2")
    wanted.press("Tab")
    page.click("#generate-button")
    # "Started" gives way to the outcome once the job has ended, which two tiny images may do within a poll
    expect(page.locator("#classgen-message")).to_contain_text(re.compile("Started|Finished"), timeout=60_000)
    expect(page.locator("#classgen-status")).to_contain_text("Finished", timeout=120_000)
    expect(page.locator("#classgen-message")).to_contain_text("Finished class image generation.")
    expect(page.locator("#classgen-progress")).to_contain_text("2 / 2 images")
    expect(page.locator("#class-gallery img")).to_have_count(2)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    shoot(page, "class-images.png")
    page.close()


def wait_for(client, done, timeout=120, allow_failure=False):
    deadline = time.monotonic() + timeout
    while not done(status := client.predict(api_name="/job_status")) and time.monotonic() < deadline:
        assert allow_failure or status["state"] != "failed", status["error"]
        time.sleep(0.5)
    assert done(status), status
    return status


def test_the_api_reports_failures_refuses_a_second_job_stops_and_resumes(app):
    from gradio_client import Client

    from engine.testing import tiny_config

    client = Client(app.url, verbose=False)
    broken = configs.to_yaml(tiny_config(app.output, model=str(app.output / "no-such-model")))
    assert client.predict(broken, api_name="/start_training").startswith("Started")
    failed = wait_for(client, lambda s: s["state"] == "failed", allow_failure=True)
    assert "no-such-model" in failed["error"]

    text = configs.to_yaml(tiny_config(app.output, **{"project": "api", "sampling.interval_steps": 0,
                                                      "trainer.max_steps": 500}))
    assert client.predict(text, api_name="/start_training").startswith("Started")
    status = wait_for(client, lambda s: s["step"] >= 1)
    assert status["kind"] == "train" and status["loss"] is not None
    assert client.predict(text, api_name="/start_training").startswith("Refused")
    assert client.predict(api_name="/stop_job").startswith("Stopping")
    stopped = wait_for(client, lambda s: s["state"] == "stopped")
    assert list(Path(stopped["run_dir"], "checkpoints").glob("step-*"))

    assert client.predict(stopped["run_dir"], api_name="/resume_training").startswith("Started")
    resumed = wait_for(client, lambda s: s["state"] == "running" and s["step"] > stopped["step"])
    assert resumed["run_dir"] == stopped["run_dir"]
    client.predict(api_name="/stop_job")
    wait_for(client, lambda s: s["state"] == "stopped")


@needs_chromium
def test_dataset_tab_shows_the_buckets_of_the_sample_data(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Dataset")
    page.click("#bucket-preview-button")
    table = page.locator("#bucket-table")
    expect(table).to_contain_text("64×64", timeout=60_000)
    expect(page.locator("#bucket-message")).to_contain_text("10 images in 1 of 1 buckets, 0 skipped")
    expect(page.locator("#bucket-thumbnails img").first).to_be_visible()
    shoot(page, "dataset-buckets.png")
    page.close()
