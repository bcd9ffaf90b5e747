"""What a newcomer meets in the page in a first hour, in a real browser (Debian's Chromium driven by
Playwright) on a 1440×900 window: optional fields left empty, a second Start or preview, a preset picked
after typing, the messages of a job that ends, the run list, and where the live view is after Start.

One app server serves the module, with its own output folder, so that the runs here are the only ones in it.
"""
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT
from scal_gui.testing import CHROMIUM, app_server, open_tab

ARTIFACTS = ROOT / "test-artifacts"

WINDOW = {"width": 1440, "height": 900}
OPTIONAL_NUMBERS = ("min-snr-gamma", "max-timestep", "network-text-encoder-lr")
# The x-axis labels of the bucket chart (vega draws them as SVG text).
CHART_LABELS_JS = """() => Array.from(document.querySelectorAll('#bucket-chart svg text'),
    t => t.textContent).filter(t => t.includes('×'))"""

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def app(class_images, tmp_path_factory):
    output = tmp_path_factory.mktemp("first-hour-output")
    with app_server("--output-dir", str(output)) as url:
        yield SimpleNamespace(url=url, output=output)


def open_page(browser, app, tab):
    return open_tab(browser, app.url, tab, WINDOW)


def type_into(page, field, text):
    box = page.locator(f"#field-{field} input")
    box.fill(text)
    box.press("Tab")


def shoot(page, name: str) -> None:
    """The window as the user sees it (not the full page), kept in test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def yaml_text(page) -> str:
    page.get_by_text("Advanced: the whole config as YAML").click()
    text = page.locator("#config-yaml").inner_text()
    page.get_by_text("Advanced: the whole config as YAML").click()
    return text


def in_window(page, selector) -> bool:
    box = page.locator(selector).bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= WINDOW["height"]


def test_opened_advanced_options_stay_empty_start_shows_the_live_view_and_the_outcome(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Train")
    page.get_by_text("Advanced training options").click()
    page.get_by_text("Network: full fine-tuning").click()
    for field in OPTIONAL_NUMBERS:
        expect(page.locator(f"#field-{field} input")).to_have_value("")
    page.click("#start-button")
    expect(page.locator("#job-message")).to_contain_text("Started training", timeout=60_000)
    expect(page.locator("#config-check")).to_have_text("The config is valid.")
    written = yaml_text(page)
    assert "min_snr_gamma" not in written and "max_timestep" not in written

    # Start is at the bottom of the settings: the live view must be in the window with it.
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step [1-9]"), timeout=120_000)
    shoot(page, "first-hour-started.png")
    assert in_window(page, "#start-button")
    for part in ("#train-status", "#loss-plot", "#sample-gallery"):
        assert in_window(page, part), part

    page.click("#stop-button")
    # "Started" or "Stopping" gives way to how the run ended, and the run list says it too
    expect(page.locator("#job-message")).to_contain_text(re.compile(r"(Stopped|Finished) training"),
                                                         timeout=120_000)
    outcome = re.search(r"(Stopped|Finished) training", page.locator("#job-message").inner_text())[1].lower()
    expect(page.locator("#resume-run input")).to_have_value(re.compile(rf"\({re.escape('step-')}\d+, {outcome}\)$"))
    page.close()


def test_each_failed_start_shows_its_own_error(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Train")
    for name in ("first-missing-model", "second-missing-model"):
        type_into(page, "model", str(app.output / name))
        page.click("#start-button")
        expect(page.locator("#job-message")).to_contain_text(f"Failed training (tiny-demo) at step 0: ",
                                                             timeout=60_000)
        expect(page.locator("#job-message")).to_contain_text(name)
        expect(page.locator("#train-status")).to_contain_text(name)
    page.close()


def test_a_second_bucket_preview_redraws_the_chart(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Dataset")
    page.click("#bucket-preview-button")
    expect(page.locator("#bucket-table")).to_contain_text("64×64", timeout=60_000)
    page.wait_for_function(f"({CHART_LABELS_JS})().join() === '64×64'")
    type_into(page, "data-resolution", "32")
    page.click("#bucket-preview-button")
    expect(page.locator("#bucket-table")).to_contain_text("32×32", timeout=60_000)
    deadline = time.monotonic() + 15
    while page.evaluate(CHART_LABELS_JS) != ["32×32"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page.evaluate(CHART_LABELS_JS) == ["32×32"]
    page.close()


def test_a_preset_keeps_the_model_the_user_typed(app, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app, "Train")
    type_into(page, "model", "/models/mine.safetensors")
    page.locator("#preset input").click()
    page.get_by_role("option", name="dreambooth-10gb").click()
    expect(page.locator("#preset-description")).not_to_contain_text("Tiny offline demo")
    expect(page.locator("#field-batch-size input")).to_have_value("1")  # the preset sets the training settings
    expect(page.locator("#field-model input")).to_have_value("/models/mine.safetensors")
    assert "model: /models/mine.safetensors" in yaml_text(page)
    expect(page.locator("#preset")).to_contain_text("a model, folder or prompt you typed is kept")
    page.close()
