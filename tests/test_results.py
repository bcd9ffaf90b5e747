"""Downloads of a run's results (scal_gui/results.py): what a run offers per kind, the samples zip, refusals of
paths outside the output folder, and one download through the real page in Chromium."""
import json
import os
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from scal_gui import results
from scal_gui.testing import CHROMIUM, app_server, open_tab

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
ARTIFACTS = ROOT / "test-artifacts"
RUN = "proj/20260101-120000"
STEPS = (10, 20)


def make_run(output: Path, name: str = RUN, network: str = "lora", converted: tuple = ()) -> Path:
    """A finished run folder as the trainer leaves it: config, metrics, samples per step, two checkpoints
    (with the adapter file for an adapter run), and converted files."""
    run = output / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"project: proj\nnetwork:\n  type: {network}\ntrainer:\n  max_steps: 20\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in STEPS))
    for step in STEPS:
        samples = run / "samples" / f"{step:06d}"
        samples.mkdir(parents=True)
        for index in range(2):
            (samples / f"00-{index:03d}.png").write_bytes(b"\x89PNG fake " + os.urandom(64))
        checkpoint = run / "checkpoints" / f"step-{step:08d}"
        checkpoint.mkdir()
        (checkpoint / "meta.json").write_text(json.dumps({"step": step, "epoch": 1,
                                                          "reason": "end" if step == STEPS[-1] else "interval"}))
        if network != "full":
            (checkpoint / results.ADAPTER_FILE).write_bytes(os.urandom(4096) + str(step).encode())
    (run / "samples" / "notes.txt").write_text("not a sample")
    if converted:
        (run / "converted").mkdir()
        for file in converted:
            (run / "converted" / file).write_bytes(os.urandom(128))
    return run


def test_an_adapter_run_offers_its_newest_adapter_file_converted_files_metrics_and_config(tmp_path):
    run = make_run(tmp_path, converted=("proj-step-20.safetensors", "proj-step-20-diffusers.safetensors"))
    (run / "converted" / ".partial.tmp").write_bytes(b"x")  # a hidden leftover is not offered

    files = results.run_files(str(tmp_path), RUN)
    assert files.adapter == (run / "checkpoints" / "step-00000020" / results.ADAPTER_FILE).resolve()
    assert files.checkpoint == "step-00000020"
    assert [p.name for p in files.converted] == ["proj-step-20-diffusers.safetensors", "proj-step-20.safetensors"]
    assert files.metrics == (run / "metrics.jsonl").resolve() and files.config == (run / "config.yaml").resolve()
    assert [p.relative_to(run).as_posix() for p in files.samples] == [
        f"samples/{step:06d}/00-{i:03d}.png" for step in STEPS for i in range(2)]
    assert files.refused == ()
    assert results.run_choices(str(tmp_path)) == [(f"proj/{run.name} (step-00000020, finished)", RUN)]


def test_a_full_run_offers_no_adapter_file_and_says_so(tmp_path):
    make_run(tmp_path, network="full")
    files = results.run_files(str(tmp_path), RUN)
    assert files.adapter is None and files.converted == ()
    assert files.metrics is not None and files.config is not None
    assert "No adapter file" in results.summary(files)


def test_the_samples_zip_holds_exactly_the_sample_pngs_by_step(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCAL_SDT_CACHE", str(cache))
    output = tmp_path / "out"
    run = make_run(output)

    target = results.zip_samples(str(output), RUN)
    assert target.parent == cache / results.DOWNLOADS and not target.is_relative_to(run)
    with zipfile.ZipFile(target) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(p.relative_to(run).as_posix() for p in run.glob("samples/*/*.png"))
        for name in names:
            assert archive.read(name) == (run / name).read_bytes()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind

    empty = make_run(output, "proj/no-samples")
    for folder in (empty / "samples").glob("*/"):
        for image in folder.iterdir():
            image.unlink()
    assert results.zip_samples(str(output), "proj/no-samples") is None


def test_a_symlink_out_of_the_output_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SCAL_SDT_CACHE", str(tmp_path / "cache"))
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.png").write_bytes(b"secret")
    (outside / "metrics.jsonl").write_text("secret\n")
    output = tmp_path / "out"
    run = make_run(output, converted=("a.safetensors",))
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    (run / "samples" / "000010" / "leak.png").symlink_to(outside / "key.png")
    (run / "converted" / "leak.safetensors").symlink_to(outside / "key.png")

    files = results.run_files(str(output), RUN)
    assert files.metrics is None
    assert [p.name for p in files.converted] == ["a.safetensors"]
    assert all(p.name != "leak.png" for p in files.samples)
    assert len(files.refused) == 3 and all("outside the output folder" in line and "\n" not in line
                                           for line in files.refused)
    with zipfile.ZipFile(results.zip_samples(str(output), RUN)) as archive:
        assert not any("leak" in name for name in archive.namelist())
    with pytest.raises(results.Refused, match="outside the output folder"):
        results.inside(output.resolve(), run / "metrics.jsonl")

    # a run folder that is itself a link out of the output folder
    elsewhere = make_run(tmp_path / "elsewhere")
    (output / "linked").mkdir()
    (output / "linked" / "run").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(results.Refused, match="outside the output folder"):
        results.run_files(str(output), "linked/run")


@pytest.mark.parametrize("name", ["../x", "/etc", "proj/../proj/20260101-120000", "proj", "proj/run/extra",
                                  "proj\\20260101-120000", "other/20260101-120000", ""])
def test_a_name_that_is_not_a_run_of_the_output_folder_is_refused(tmp_path, name):
    output = tmp_path / "out"
    make_run(output)
    make_run(tmp_path, "x/y")  # a run beside the output folder, which ../x would reach
    with pytest.raises(results.Refused) as refusal:
        results.run_files(str(output), name)
    assert "\n" not in str(refusal.value) and str(refusal.value).startswith("Refused:")
    with pytest.raises(results.Refused):
        results.zip_samples(str(output), name)
    with pytest.raises(results.Refused):
        results.run_files(str(output), str(output / RUN))  # an absolute path, even to the run itself


@needs_chromium
def test_the_page_downloads_the_adapter_file(tmp_path, browser):
    from playwright.sync_api import expect

    output = tmp_path / "output"
    run = make_run(output, converted=("proj-step-20.safetensors",))
    adapter = run / "checkpoints" / "step-00000020" / results.ADAPTER_FILE
    # The app's temp folder apart from the output folder: gradio would copy a file in its temp folder to its
    # cache and serve it whatever the page allows; a run folder elsewhere is served only as results.serve says.
    app_temp = tmp_path / "app-temp"
    app_temp.mkdir()
    with app_server("--output-dir", str(output), env={"TMPDIR": str(app_temp)}) as url:
        page = open_tab(browser, url, "Convert", {"width": 1280, "height": 1000})
        page.get_by_text("Results: download a run's files").click()
        expect(page.locator("#results-run input")).to_have_value(f"proj/{run.name} (step-00000020, finished)")
        button = page.locator("#download-adapter")
        expect(button).to_be_visible()
        expect(button).to_contain_text("step-00000020")
        with page.expect_download() as download_info:
            button.click()
        download = download_info.value
        saved = tmp_path / "downloaded"
        download.save_as(saved)
        assert download.suggested_filename == results.ADAPTER_FILE
        assert saved.read_bytes() == adapter.read_bytes()

        expect(page.locator("#download-converted")).to_contain_text("proj-step-20")  # the name is drawn in two spans

        # the samples: zipped on demand, then offered
        page.click("#zip-samples")
        zipped = page.locator("#download-samples")
        expect(zipped).to_be_visible(timeout=30_000)
        with page.expect_download() as download_info:
            zipped.click()
        download_info.value.save_as(tmp_path / "samples.zip")
        with zipfile.ZipFile(tmp_path / "samples.zip") as archive:
            assert len(archive.namelist()) == 2 * len(STEPS)
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#results").screenshot(path=str(ARTIFACTS / "results.png"))
        page.close()
