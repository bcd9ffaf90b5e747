"""The app's logic without a browser: form <-> config, the job manager, messages, rendering, flags."""
import gc
import re
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from conftest import ROOT
from engine import config as schema
from engine import events, notices
from scal_gui import charts, configs, fields, live, presets, server, tab_dataset
from scal_gui.actions import Actions
from scal_gui.jobs import CLASSGEN, TRAIN, JobBusy, JobManager


# -- form fields and the config schema ------------------------------------------------------------------
def test_every_form_default_is_the_schemas():
    defaults = schema.default_dict()
    defaults["data"]["concepts"] = [dataclass_dict(schema.Concept(class_set=schema.ClassSet()))]
    defaults["sampling"]["concepts"] = [dataclass_dict(schema.SamplePrompt())]
    for spec in fields.ALL:
        assert spec.default == fields.get_value(defaults, spec.key), spec.key


def dataclass_dict(value):
    import dataclasses

    return dataclasses.asdict(value)


def test_a_changed_schema_default_reaches_the_form(monkeypatch):
    import dataclasses

    (lr,) = [f for f in dataclasses.fields(schema.OptimizerParams) if f.name == "lr"]
    monkeypatch.setattr(lr, "default", 3e-5)
    spec = next(f for f in fields.TRAIN if f.key == "optimizer.params.lr")
    assert spec.default == 3e-5
    assert fields.form_values({}, [spec]) == [3e-5]


def test_choices_come_from_the_schema():
    by_key = {f.key: f for f in fields.ALL}
    assert by_key["trainer.accelerator"].choices == ("auto", "gpu", "cuda", "cpu")
    assert set(by_key["trainer.precision"].choices) == set(schema.PRECISIONS)
    assert by_key["seed"].optional and by_key["seed"].kind == "int"


def test_the_optimizer_is_picked_from_the_short_names_or_typed_as_a_class_path():
    from scal_gui import widgets

    (spec,) = [f for f in fields.TRAIN if f.key == "optimizer.name"]
    assert spec.kind == "choice" and spec.choices == schema.OPTIMIZER_NAMES
    assert spec.fits("prodigy") and spec.fits("bitsandbytes.optim.AdamW8bit") and not spec.fits(3)
    raw = {"optimizer": {"name": "torch.optim.AdamW"}}
    assert fields.apply_form(raw, [spec], ["came_pytorch.CAME"]) == {"optimizer": {"name": "came_pytorch.CAME"}}
    dropdown = widgets.component(spec, "torch.optim.AdamW")
    assert dropdown.allow_custom_value and [value for _, value in dropdown.choices] == list(schema.OPTIMIZER_NAMES)
    accelerator = widgets.component(next(f for f in fields.TRAIN if f.key == "trainer.accelerator"), "auto")
    assert not accelerator.allow_custom_value


@pytest.mark.parametrize("preset", presets.list_presets(), ids=lambda p: p.name)
def test_an_untouched_form_leaves_each_preset_as_it_is(preset):
    raw = presets.load_preset(preset)
    values = fields.form_values(raw, fields.ALL)
    assert fields.apply_form(raw, fields.ALL, values) == raw
    merged, message = configs.merge_form(configs.to_yaml(raw), values)
    assert configs.parse_yaml(merged) == raw
    if raw["model"].startswith("demo:"):
        assert message == "The config is valid."
    else:  # a GPU preset names a Hub model, downloaded at Start, and data folders the user replaces
        assert message.startswith("Error: config key 'data.concepts[0].instance_set.path': not found: data/"), message


def test_form_and_yaml_round_trip():
    raw = presets.load_preset(next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu"))
    values = fields.form_values(raw, fields.ALL)
    index = {f.key: i for i, f in enumerate(fields.ALL)}
    values[index["batch_size"]] = 3
    values[index["seed"]] = ""  # what the page sends for an emptied optional number
    values[index["trainer.precision"]] = "bf16"
    merged, message = configs.merge_form(configs.to_yaml(raw), values)
    written = configs.parse_yaml(merged)
    assert (written["batch_size"], written["seed"], written["trainer"]["precision"]) == (3, None, "bf16")
    assert written["sampling"] == raw["sampling"]  # keys the form does not show are kept
    back, _ = configs.form_from_yaml(merged)
    assert back == values


def test_yaml_edits_reach_the_form_and_bad_yaml_does_not():
    text = configs.to_yaml({"model": "m", "batch_size": 0, "optimizer": {"params": {"lr": "2e-6"}}})
    values, message = configs.form_from_yaml(text)
    index = {f.key: i for i, f in enumerate(fields.ALL)}
    assert values[index["batch_size"]] == 0 and values[index["optimizer.params.lr"]] == 2e-6
    assert "batch_size" in message and message.startswith("Error:")
    values, message = configs.form_from_yaml("model: [unclosed\n")
    assert values is None and message.startswith("Error: YAML syntax error at line 2, column 1: ")
    merged, message = configs.merge_form("batch_size: many\n", fields.form_values({}, fields.ALL))
    assert merged is None and "batch_size" in message


def test_the_check_notes_only_what_its_own_config_causes(monkeypatch):
    raw = presets.load_preset(next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu"))
    raw["trainer"]["benchmark"] = True
    from_dict = schema.from_dict

    def while_a_run_warns(values):
        # Another thread reports an ignored key of its own meanwhile (without a sink: a Python warning).
        run = threading.Thread(target=notices.warn, args=("from the training thread", schema.ConfigWarning))
        run.start()
        run.join()
        return from_dict(values)

    monkeypatch.setattr(schema, "from_dict", while_a_run_warns)
    with pytest.warns(schema.ConfigWarning, match="from the training thread"):
        _, notes = configs.load(raw)
    assert notes == ["config key 'trainer.benchmark' has no effect in SCAL-SDT and is ignored"]


def test_a_native_config_gets_no_class_set_from_the_form():
    raw = presets.load_preset(next(p for p in presets.list_presets() if p.name == "native-finetune"))
    merged = fields.apply_form(raw, fields.ALL, fields.form_values(raw, fields.ALL))
    assert "class_set" not in merged["data"]["concepts"][0]


def test_a_form_value_for_an_absent_list_item_adds_the_item():
    by_key = {f.key: f for f in fields.ALL}
    specs = [by_key["data.concepts[0].instance_set.path"], by_key["sampling.concepts[0].prompt"]]
    merged = fields.apply_form({"sampling": {"concepts": []}}, specs, ["/photos", "a dog"])
    assert merged == {"data": {"concepts": [{"instance_set": {"path": "/photos"}}]},
                      "sampling": {"concepts": [{"prompt": "a dog"}]}}


def test_the_form_is_not_written_over_a_value_that_holds_no_keys():
    values = fields.form_values({}, fields.ALL)
    values[[f.key for f in fields.ALL].index("data.resolution")] = 256
    merged, message = configs.merge_form("data: 5\n", values)
    assert merged is None and message.startswith("Error: Fix the YAML first: config key 'data'")


def test_empty_optional_numbers_stay_empty_from_the_form_to_the_config():
    from scal_gui import widgets

    raw = presets.load_preset(next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu"))
    optional = [f for f in fields.ALL if f.optional and f.kind in ("int", "float")]
    assert {"min_snr_gamma", "max_timestep", "network.text_encoder_lr"} <= {f.key for f in optional}
    for spec in optional:
        # A number input would show None as 0 and send the 0 back; a text box keeps it empty.
        box = widgets.component(spec, spec.to_form(None))
        assert isinstance(box, widgets.gr.Textbox) and box.value == "", spec.key
        assert spec.from_form("") is None and spec.from_form(spec.to_form(5)) == 5
    merged, message = configs.merge_form(configs.to_yaml(raw), fields.form_values(raw, fields.ALL))
    written = configs.parse_yaml(merged)
    assert message == "The config is valid."
    assert "min_snr_gamma" not in written and "max_timestep" not in written
    assert "text_encoder_lr" not in written.get("network", {})


def test_an_empty_required_number_is_named():
    spec = next(f for f in fields.TRAIN if f.key == "batch_size")
    with pytest.raises(fields.FormError, match="batch_size"):
        spec.from_form(None)
    with pytest.raises(fields.FormError, match="integer"):
        spec.from_form(1.5)


# -- presets ------------------------------------------------------------------------------------------
def test_default_preset_depends_on_the_gpu(monkeypatch):
    found = presets.list_presets()
    assert presets.default_preset(found, gpu=False).name == "tiny-demo-cpu"
    assert presets.default_preset(found, gpu=True).name != "tiny-demo-cpu"
    assert all(p.description for p in found)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not presets.has_cuda_gpu()


def test_the_app_output_folder_replaces_the_presets():
    preset = presets.list_presets()[0]
    assert presets.load_preset(preset, "/tmp/elsewhere")["output_dir"] == "/tmp/elsewhere"


def preset_named(name):
    return next(p for p in presets.list_presets() if p.name == name)


def test_a_preset_keeps_the_model_folders_and_prompts_the_user_typed():
    from scal_gui import tab_train

    before, after = preset_named("tiny-demo-cpu"), preset_named("dreambooth-10gb")
    values = fields.form_values(presets.load_preset(before, "/out"), fields.ALL)
    keys = [f.key for f in fields.ALL]
    values[keys.index("model")] = "/models/mine.safetensors"
    values[keys.index("data.concepts[0].instance_set.prompt")] = "a photo of ohwx person"
    values[keys.index("batch_size")] = 7  # a training setting: the preset's replaces it
    raw = tab_train.preset_config(after, before, values, "/out")
    wanted = presets.load_preset(after, "/out")
    assert raw["model"] == "/models/mine.safetensors"
    assert fields.get_value(raw, "data.concepts[0].instance_set.prompt") == "a photo of ohwx person"
    # fields the user left as the previous preset had them take the new preset's
    for key in ("data.concepts[0].instance_set.path", "sampling.concepts[0].prompt", "batch_size",
                "optimizer.params.lr"):
        assert fields.get_value(raw, key) == fields.get_value(wanted, key), key
    assert "kept" in tab_train.PRESET_INFO


# -- the job manager ----------------------------------------------------------------------------------
class FakeJob:
    """Emits a scripted list of events from a thread; stops between events when asked."""

    def __init__(self, event_queue, script, hold=None):
        self.events, self.script, self.hold = event_queue, script, hold
        self.thread = None
        self.stopped = threading.Event()

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        for event in self.script:
            if self.hold is not None and isinstance(event, events.Finished):
                self.hold.wait(10)
                event = events.Finished(run_dir="run", step=2, stopped=self.stopped.is_set())
            self.events.put(event)

    def stop(self):
        self.stopped.set()
        if self.hold is not None:
            self.hold.set()


RUN = [events.Started(run_dir="run", total_steps=4), events.Log(message="hello"),
       events.Step(step=1, epoch=0, loss=0.5, lr=1e-4, it_per_s=2.0, eta_s=1.5, total_steps=4),
       events.Step(step=2, epoch=0, loss=0.25, lr=1e-4, it_per_s=2.0, eta_s=1.0, total_steps=4),
       events.Sample(step=2, paths=["a.png", "b.png"]), events.CheckpointSaved(step=2, path="ckpt"),
       events.Finished(run_dir="run", step=2)]


def wait_until_ended(manager, timeout=10):
    """Poll the current job's history, as the page does, until it is in its final state."""
    deadline = time.monotonic() + timeout
    while manager.snapshot().active:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_history_records_what_the_job_reports():
    manager = JobManager()
    manager.start(TRAIN, lambda q: FakeJob(q, RUN), "demo")
    assert wait_until_ended(manager)
    history = manager.snapshot(TRAIN)
    assert history.state == "finished" and history.run_dir == "run"
    assert [p["loss"] for p in history.points] == [0.5, 0.25]
    assert history.samples == [(2, "a.png"), (2, "b.png")] and history.checkpoints == [(2, "ckpt")]
    assert any("hello" in line for line in history.logs)
    assert manager.stop() == "No job is running."


def test_an_ended_job_is_let_go_and_its_history_kept():
    manager = JobManager()
    built = []

    def build(event_queue):
        built.append(FakeJob(event_queue, RUN))
        return built[-1]

    manager.start(TRAIN, build)
    assert wait_until_ended(manager)
    job = weakref.ref(built.pop())
    deadline = time.monotonic() + 5
    while job() is not None and time.monotonic() < deadline:  # the job's own thread may still be ending
        gc.collect()
        time.sleep(0.02)
    assert job() is None
    assert manager.snapshot(TRAIN).state == "finished"


def test_the_log_lists_the_images_a_run_skipped():
    manager = JobManager()
    summary = {"skipped": 1, "skipped_reasons": [{"path": "/data/bad.png", "reason": "cannot read image"}]}
    manager.start(TRAIN, lambda q: FakeJob(q, RUN[:-1] + [events.Finished(run_dir="run", step=2, summary=summary)]))
    assert wait_until_ended(manager)
    logs = manager.snapshot(TRAIN).logs
    assert any(line.endswith("1 images were skipped:") for line in logs)
    assert "  /data/bad.png: cannot read image" in logs


def test_one_job_at_a_time_and_stop():
    manager = JobManager()
    hold = threading.Event()
    manager.start(TRAIN, lambda q: FakeJob(q, RUN, hold), "first")
    with pytest.raises(JobBusy, match="training run is already running"):
        manager.start(CLASSGEN, lambda q: FakeJob(q, RUN), "second")
    assert manager.stop().startswith("Stopping")
    assert wait_until_ended(manager)
    assert manager.snapshot(TRAIN).state == "stopped"
    assert manager.stop() == "No job is running."
    manager.start(CLASSGEN, lambda q: FakeJob(q, [events.Finished()]), "after")  # free again
    assert wait_until_ended(manager)
    assert manager.snapshot(TRAIN).label == "first"  # each kind keeps its last history


class InterleavingLock:
    """A lock that lets `rival` run each time the `owner` thread lets the lock go, before it goes on."""

    def __init__(self, rival):
        self.lock, self.rival, self.owner = threading.Lock(), rival, None

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        if threading.get_ident() == self.owner:
            thread = threading.Thread(target=self.rival)
            thread.start()
            thread.join(10)


def test_no_other_job_starts_at_any_point_of_a_start():
    manager = JobManager()
    outcomes = []

    def rival():
        try:
            manager.start(CLASSGEN, lambda q: FakeJob(q, [events.Finished()]), "rival")
            outcomes.append("started")
        except JobBusy:
            outcomes.append("refused")

    # The manager holds its lock in several short blocks; a start between two of them must be refused too.
    manager._lock = lock = InterleavingLock(rival)
    hold = threading.Event()
    lock.owner = threading.get_ident()
    manager.start(TRAIN, lambda q: FakeJob(q, RUN, hold), "first")
    lock.owner = None
    manager.stop()
    assert wait_until_ended(manager)
    assert outcomes and set(outcomes) == {"refused"}, outcomes
    assert manager.snapshot(CLASSGEN) is None


def test_a_failure_is_recorded_and_frees_the_manager():
    manager = JobManager()
    manager.start(TRAIN, lambda q: FakeJob(q, [events.Failed(error="boom\ntrace", user_error=False)]))
    assert wait_until_ended(manager)
    history = manager.snapshot(TRAIN)
    assert history.state == "failed" and history.error.startswith("boom")
    assert "boom" in live.status_line(history, "") and "trace" in live.log_text(history)
    assert manager.stop() == "No job is running."


def test_each_start_of_a_job_that_fails_at_once_shows_its_own_error():
    manager = JobManager()
    seen = []
    for error in ("first model is missing", "second model is missing"):
        manager.start(TRAIN, lambda q, error=error: FakeJob(q, [events.Failed(error=error, user_error=True)]),
                      "demo")
        assert wait_until_ended(manager)
        seen.append(manager.version(TRAIN))
        # the page's message still says Started: the poll replaces it with this job's outcome
        settled = live.settled_message("Started training (demo).", manager.snapshot(TRAIN))
        assert settled.startswith("**Failed**") and error in settled
    assert seen[1] > seen[0]  # the page redraws a history whose version it has not drawn


def test_started_and_stopping_give_way_to_the_outcome():
    manager = JobManager()
    hold = threading.Event()
    manager.start(TRAIN, lambda q: FakeJob(q, RUN, hold), "demo")
    assert live.settled_message("Started training (demo).", manager.snapshot(TRAIN)) is None  # still going
    stopping = manager.stop()
    assert wait_until_ended(manager)
    history = manager.snapshot(TRAIN)
    assert live.settled_message(stopping, history) == "**Stopped** demo at step 2."
    # messages that are not about a job in progress stand
    for message in ("Not started: config key 'batch_size'", "Refused: busy", "Estimated peak GPU memory", None):
        assert live.settled_message(message, history) is None


def test_a_job_that_dies_silently_is_failed():
    manager = JobManager()
    manager.start(TRAIN, lambda q: FakeJob(q, [events.Started(run_dir="r")]))
    assert wait_until_ended(manager)
    assert manager.snapshot(TRAIN).state == "failed"


def test_a_job_that_cannot_be_built_starts_nothing():
    manager = JobManager()

    def build(_):
        raise schema.ConfigError("config key 'x': bad")

    with pytest.raises(schema.ConfigError):
        manager.start(TRAIN, build)
    assert manager.snapshot(TRAIN) is None
    manager.start(CLASSGEN, lambda q: FakeJob(q, [events.Finished()]))  # not refused: the manager is free
    assert wait_until_ended(manager)


# -- actions: the messages the page shows -------------------------------------------------------------
def tiny_yaml(tmp_path, **overrides):
    from engine.testing import tiny_config

    return configs.to_yaml(tiny_config(tmp_path, **overrides))


def test_an_invalid_config_starts_no_job(tmp_path):
    actions = Actions(JobManager())
    message = actions.start_training(tiny_yaml(tmp_path, batch_size=0))
    assert message.startswith("Not started") and "batch_size" in message
    assert "line" in actions.start_training("model: [\n")
    assert actions.manager.snapshot() is None and actions.status() == {"kind": None, "state": "idle"}


def test_generation_needs_a_class_folder(tmp_path):
    message = Actions(JobManager()).generate_class_images(tiny_yaml(tmp_path, **{"data.concepts[0].class_set": None,
                                                                               "prior_preservation.enabled": False}))
    assert message == "Error: Set a class folder on the Dataset tab first."


def test_a_second_start_is_refused(tmp_path):
    manager = JobManager()
    hold = threading.Event()
    manager.start(CLASSGEN, lambda q: FakeJob(q, RUN, hold))
    try:
        message = Actions(manager).start_training(tiny_yaml(tmp_path))
        assert message.startswith("Refused") and "Class image generation is already running" in message
    finally:
        manager.stop()
        wait_until_ended(manager)


def test_an_engine_fault_while_building_is_a_message(tmp_path, monkeypatch):
    from scal_gui import job_kinds

    def broken(config):
        def build(_):
            raise RuntimeError("engine bug")
        return build

    monkeypatch.setattr(job_kinds, "train_builder", broken)
    message = Actions(JobManager()).start_training(tiny_yaml(tmp_path))
    assert message == "Not started: RuntimeError: engine bug"


def test_status_reports_the_current_job():
    actions = Actions(JobManager())
    actions.manager.start(TRAIN, lambda q: FakeJob(q, RUN))
    assert wait_until_ended(actions.manager)
    status = actions.status()
    assert (status["state"], status["step"], status["loss"]) == ("finished", 2, 0.25)
    assert status["samples"] == ["a.png", "b.png"]


def test_conversion_through_the_actions(tiny_model, tmp_path):
    from scal_gui import convert_options

    defaults = convert_options.defaults()
    assert defaults["unet_dtype"] == ("fp32", ["fp16", "bf16", "fp32"]) and defaults["text_encoder"][0] is True
    values = [value for value, _ in defaults.values()]
    values[convert_options.ORDER.index("unet_dtype")] = "fp16"
    kwargs = convert_options.to_kwargs(values)
    assert kwargs["fmt"] is None and kwargs["unet_dtype"] == "fp16"
    actions = Actions(JobManager())
    message = actions.convert(str(tiny_model), str(tmp_path / "tiny.safetensors"), kwargs)
    assert message.startswith("Wrote") and (tmp_path / "tiny.safetensors").is_file() and "MB)" in message
    again = actions.convert(str(tiny_model), str(tmp_path / "tiny.safetensors"), kwargs)
    assert again.startswith("Error:") and "already exists" in again


def test_the_convert_tab_names_its_checkbox_not_the_command_line_flag(tiny_model, tmp_path):
    from scal_gui import convert_options, tab_convert

    values = [value for value, _ in convert_options.defaults().values()]
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"")
    message = tab_convert.convert_and_report(Actions(JobManager()), str(tiny_model), str(out), values,
                                             lambda *args, **kwargs: None)
    assert message.startswith("Error:") and "already exists" in message
    assert "--overwrite" not in message and f'"{tab_convert.LABELS["overwrite"]}"' in message


def write_run(root, name, max_steps, checkpoints):
    """A run folder as the trainer leaves it: config.yaml and checkpoints/step-N/meta.json (step, reason)."""
    import json

    from engine.checkpoints import META_FILE, checkpoint_name

    run = root / "proj" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(configs.to_yaml({"trainer": {"max_steps": max_steps}}))
    for step, reason in checkpoints:
        folder = run / "checkpoints" / checkpoint_name(step)
        folder.mkdir(parents=True)
        (folder / META_FILE).write_text(json.dumps({"step": step, "epoch": 0, "reason": reason}))
    return run


def test_the_run_lists_say_how_each_run_ended(tmp_path):
    from scal_gui import runs, tab_convert, tab_train

    write_run(tmp_path, "ended", 100, [(50, "every_n_train_steps"), (100, "end")])
    # the end of the run fell on a periodic checkpoint, which the end does not save again
    write_run(tmp_path, "ended-on-periodic", 40, [(20, "every_n_train_steps"), (40, "every_n_train_steps")])
    write_run(tmp_path, "stopped", 100, [(30, "stop")])
    write_run(tmp_path, "killed", 100, [(20, "every_n_train_steps")])
    running = write_run(tmp_path, "running", 100, [(20, "every_n_train_steps")])
    labels = dict((path.split("/")[-1], label) for label, path in tab_train.resume_choices(str(tmp_path), str(running)))
    assert labels["ended"].endswith(f"{runs.FINISHED})") and labels["ended-on-periodic"].endswith(f"{runs.FINISHED})")
    assert labels["stopped"].endswith(f"{runs.STOPPED})") and labels["killed"].endswith(f"{runs.ENDED_EARLY})")
    assert labels["running"].endswith(f"{runs.RUNNING})")
    assert all(label.endswith(f"({runs.STOPPED})") for label, path in tab_convert.checkpoint_choices(str(tmp_path))
               if "/stopped/" in path)


def test_gpu_memory_estimate_of_the_demo():
    raw = presets.load_preset(next(p for p in presets.list_presets() if p.name == "tiny-demo-cpu"))
    message = Actions(JobManager()).estimate_vram(configs.to_yaml(raw))
    assert re.match(r"Estimated peak GPU memory: \*\*\d+\.\d\d GiB\*\* \(parameters ", message), message
    # the demo trains on the CPU: while training, system RAM holds the step's peak as well
    ram = re.search(r"system RAM: \*\*(\d+\.\d\d) GiB\*\* at its peak \((\d+\.\d\d) GiB while loading the model, "
                    r"(\d+\.\d\d) GiB while training\)", message)
    assert ram and float(ram[1]) == max(float(ram[2]), float(ram[3])) > 0.4, message
    # the step the estimate traced, as the trainer's run plan has it
    assert message.endswith("Step: 4 rows of 64x64, no autocast, float32 weights, AdamW"), message


# -- rendering ------------------------------------------------------------------------------------------
def test_smoothing_and_thinning():
    assert charts.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert charts.smooth([1.0, 0.0])[0] == pytest.approx(1.0)  # debiased: no pull towards zero
    points = [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 5001)]
    frame = charts.loss_frame(points)
    raw = frame[frame.series == "raw"]
    assert len(raw) <= charts.MAX_POINTS + 1 and raw.step.iloc[-1] == 5000
    assert charts.loss_frame([]) is None


def test_progress_line():
    manager = JobManager()
    hold = threading.Event()
    manager.start(TRAIN, lambda q: FakeJob(q, RUN, hold))
    deadline = time.monotonic() + 10
    while manager.snapshot(TRAIN).step < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    text = live.train_progress(manager.snapshot(TRAIN))
    assert "step 2 / 4" in text and "2.00 it/s" in text and "ETA 0:01" in text and 'width:50.0%' in text
    manager.stop()
    wait_until_ended(manager)


def test_a_run_generating_its_class_images_shows_their_progress_then_its_steps():
    manager = JobManager()
    hold = threading.Event()
    script = [events.Started(run_dir="run", total_steps=4), events.Progress(done=2, total=6, eta_s=3.0),
              events.Finished(run_dir="run", step=0)]
    manager.start(TRAIN, lambda q: FakeJob(q, script, hold))
    deadline = time.monotonic() + 10
    while manager.snapshot(TRAIN).done < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    text = live.train_progress(manager.snapshot(TRAIN))
    assert "class images 2 / 6 · ETA 0:03" in text and "width:33.3%" in text
    manager.stop()
    wait_until_ended(manager)
    # once steps run (or the run ended) the bar counts steps again
    assert "step 0 / 4" in live.train_progress(manager.snapshot(TRAIN))


def test_each_bucket_preview_empties_the_one_thumbnails_folder():
    first = tab_dataset.cleared_thumbnails_dir()
    (first / "earlier-preview.png").write_bytes(b"")
    second = tab_dataset.cleared_thumbnails_dir()
    assert second == first == tab_dataset.thumbnails_dir() and list(second.iterdir()) == []


def test_thumbnail_veils_what_the_crop_cuts(tmp_path):
    from PIL import Image

    from scal_gui.thumbnails import draw_crop

    source = tmp_path / "wide.png"
    Image.new("RGB", (400, 200), (200, 200, 200)).save(source)
    thumb = Image.open(draw_crop(str(source), (100, 0, 300, 200), tmp_path / "thumbs", side=200))
    assert thumb.size == (200, 100)
    outside, inside = thumb.getpixel((10, 50)), thumb.getpixel((100, 50))
    assert outside[0] < inside[0] - 50
    assert thumb.getpixel((51, 50)) == (255, 255, 255) and thumb.getpixel((50, 50)) == (0, 0, 0)  # the outline


def test_an_edit_pair_shows_its_control_left_of_its_target_in_the_bucket_preview(tmp_path):
    """An edit model's pairs: each listed target with its control images (x.control.png, x.control2.png),
    drawn to its left in the thumbnail; a target without one shows alone."""
    from PIL import Image

    from engine.data.buckets_cli import bucket_report
    from scal_gui import bucket_view

    folder = tmp_path / "pairs"
    folder.mkdir()
    Image.new("RGB", (64, 64), (250, 250, 250)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (200, 0, 0)).save(folder / "a.control.png")
    Image.new("RGB", (64, 64), (0, 0, 200)).save(folder / "a.control2.png")
    Image.new("RGB", (64, 64), (250, 250, 250)).save(folder / "b.png")
    config = schema.from_dict(bucket_values(tmp_path, folder))
    with notices.collect(lambda message: None):
        report = bucket_report(config)
    (bucket,) = [bucket for bucket in report["buckets"] if bucket["count"]]
    assert {Path(image["path"]).name: image.get("controls") for image in bucket["images"]} == {
        "a.png": [str(folder / "a.control.png"), str(folder / "a.control2.png")], "b.png": None}
    shown = dict((caption, path) for path, caption in
                 bucket_view.thumbnails(report, bucket_view.bucket_label(bucket), tmp_path / "thumbs"))
    pair, alone = Image.open(shown["a.png (control → target)"]), Image.open(shown["b.png"])
    assert pair.width == 3 * alone.width + 2 * 4 and pair.height == alone.height
    # control, second control, then the target (its crop drawn), left to right
    middle = alone.height // 2
    assert pair.getpixel((alone.width // 2, middle))[0] > 150 > pair.getpixel((alone.width // 2, middle))[2]
    assert pair.getpixel((alone.width + 4 + alone.width // 2, middle))[2] > 150
    assert pair.getpixel((2 * (alone.width + 4) + alone.width // 2, middle)) == alone.getpixel(
        (alone.width // 2, middle))


# -- the Dataset tab on large datasets: counts of all images, a bounded sample of them ---------------------
def mixed_folder(folder, count=300, tiny=30, broken=0):
    """img_000... with every third 8 x 8 (bucket 64 x 64 at resolution 64) and the others 16 x 8 (bucket
    104 x 56), tiny_00... at 2 x 2 (too small to train) and broken_00... that are no images. Returns the
    paths going to each of the two buckets, in name order."""
    from PIL import Image

    folder.mkdir()
    square, wide = Image.new("RGB", (8, 8), (200, 40, 40)), Image.new("RGB", (16, 8), (40, 40, 200))
    by_bucket = {(64, 64): [], (104, 56): []}
    for index in range(count):
        path = folder / f"img_{index:03d}.png"
        (square if index % 3 == 0 else wide).save(path)
        by_bucket[(64, 64) if index % 3 == 0 else (104, 56)].append(str(path))
    for index in range(tiny):
        Image.new("RGB", (2, 2)).save(folder / f"tiny_{index:02d}.png")
    for index in range(broken):
        (folder / f"broken_{index:02d}.png").write_bytes(b"not a png")
    return by_bucket


def bucket_values(tmp_path, path, **overrides):
    from engine.testing import tiny_config

    return tiny_config(tmp_path, **{"aspect_ratio_bucket.enabled": True, "prior_preservation.enabled": False,
                                    "data.concepts": [{"instance_set": {"path": str(path), "prompt": "x"}}],
                                    **overrides})


def test_the_bucket_report_counts_every_image_but_lists_an_even_spread_of_each_bucket(tmp_path):
    from collections import Counter

    from engine.data.buckets import plan_buckets
    from engine.data.buckets_cli import bucket_report
    from engine.data.index import scan_folder

    folder = tmp_path / "images"
    by_bucket = mixed_folder(folder, broken=20)
    config = schema.from_dict(bucket_values(tmp_path, folder))
    with notices.collect(lambda message: None):
        report = bucket_report(config, sample=8, skipped_limit=10)
        full = plan_buckets(config, scan_folder(str(folder), "x").records)
    planned = Counter(full.assignments)
    assert [b["count"] for b in report["buckets"]] == [planned[i] for i in range(len(full.sizes))]
    filled = {(b["width"], b["height"]): b for b in report["buckets"] if b["count"]}
    assert {size: b["count"] for size, b in filled.items()} == {(64, 64): 100, (104, 56): 200}
    # Eight of each bucket, from its first image to its last, not its first eight.
    spread = {(64, 64): [0, 14, 28, 42, 57, 71, 85, 99], (104, 56): [0, 28, 57, 85, 114, 142, 171, 199]}
    for size, positions in spread.items():
        assert [image["path"] for image in filled[size]["images"]] == [by_bucket[size][i] for i in positions]
    assert all(not b["images"] for b in report["buckets"] if not b["count"])
    assert filled[(104, 56)]["images"][0] == {"path": by_bucket[(104, 56)][0], "width": 16, "height": 8,
                                               "crop": [1, 0, 15, 8]}
    # 20 unreadable files (from the scan, listed first) and 30 too small ones (from the plan).
    assert report["skipped_count"] == 50 and report["shards"] == 0
    assert [item["path"] for item in report["skipped"]] == [str(folder / f"broken_{i:02d}.png") for i in range(10)]


def test_the_bucket_report_looks_up_masks_for_the_listed_images_only(tmp_path, monkeypatch):
    from PIL import Image

    from engine.data import buckets_cli

    folder = tmp_path / "images"
    mixed_folder(folder, tiny=0)
    for index in range(0, 300, 2):
        Image.new("L", (16, 8) if index % 3 else (8, 8), 255).save(folder / f"img_{index:03d}.mask.png")
    looked_up = []

    def concept_masks(instance_set, index, records):
        looked_up.append(len(records))
        return real(instance_set, index, records)

    real = buckets_cli.concept_masks
    monkeypatch.setattr(buckets_cli, "concept_masks", concept_masks)
    config = schema.from_dict(bucket_values(tmp_path, folder, **{"masked_loss.enabled": True}))
    report = buckets_cli.bucket_report(config, sample=8)
    assert looked_up == [16]
    listed = [image for b in report["buckets"] for image in b["images"]]
    assert len(listed) == 16
    for image in listed:
        number = int(image["path"][-7:-4])
        assert image["mask"] == (str(folder / f"img_{number:03d}.mask.png") if number % 2 == 0 else None)
    assert sum(image["mask"] is not None for image in listed) == 8


def test_the_dataset_preview_draws_at_most_the_thumbnail_cap_and_lists_the_first_skipped(tmp_path, monkeypatch):
    from scal_gui import bucket_view

    folder = tmp_path / "images"
    mixed_folder(folder, broken=20)
    monkeypatch.setattr(bucket_view, "MAX_SKIPPED_ROWS", 10)
    raw = bucket_values(tmp_path, folder)
    with notices.collect(lambda message: None):
        message, table, _, skipped, choice, thumbnails, result = tab_dataset.preview(
            configs.to_yaml(raw), *fields.form_values(raw, fields.ALL))
    assert message.startswith("300 images in 2 of 19 buckets, 50 skipped (first 10 shown). A bucket of more "
                              "than 48 images shows 48 of them")
    assert table["images"].tolist()[table["bucket"].tolist().index("64×64")] == 100
    assert skipped["image"].tolist() == [str(folder / f"broken_{i:02d}.png") for i in range(10)]
    assert choice["choices"] == ["64×64", "104×56"] and choice["value"] == "64×64"
    assert bucket_view.MAX_THUMBNAILS == 48 and len(thumbnails) == 48
    names = [caption for _, caption in thumbnails]
    assert names[0] == "img_000.png" and names[-1] == "img_297.png" and len(set(names)) == 48
    wide = tab_dataset.show_bucket(result, "104×56")
    assert [caption for _, caption in wide][::47] == ["img_001.png", "img_299.png"] and len(wide) == 48


def test_the_dataset_preview_names_the_shards_it_read(tmp_path):
    from engine.data.make_shards import make_shards

    folder, shards = tmp_path / "images", tmp_path / "shards"
    mixed_folder(folder, count=60, tiny=0)
    assert len(make_shards(str(folder), str(shards), per_shard=25, say=lambda line: None)) == 3
    raw = bucket_values(tmp_path, shards)
    message, *_, thumbnails, result = tab_dataset.preview(configs.to_yaml(raw), *fields.form_values(raw, fields.ALL))
    assert message == "60 images from 3 shards in 2 of 19 buckets, 0 skipped."
    assert result["shards"] == 3 and len(thumbnails) == 20
    assert thumbnails[0][1] == "000000.tar#img_000.png"

# -- flags ----------------------------------------------------------------------------------------------
def options(*argv, env=None):
    return server.launch_options(server.build_parser().parse_args(list(argv)), env or {})


def test_share_needs_a_login():
    with pytest.raises(server.LaunchError, match="--auth"):
        options("--share")
    assert options("--share", "--auth", "me:secret")["auth"] == ("me", "secret")
    assert options("--share", env={"SCAL_AUTH": "me:pw"})["auth"] == ("me", "pw")
    with pytest.raises(server.LaunchError, match="USER:PASS"):
        options("--auth", "nopassword")


def test_listen_and_port():
    assert options()["server_name"] == "127.0.0.1"
    assert options("--listen")["server_name"] == "0.0.0.0"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert options("--port", str(port))["server_port"] > port


def test_the_page_builds_without_torch():
    code = ("import sys; from scal_gui.page import build_page; build_page(); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_training_option_has_a_field_in_the_advanced_section():
    options = {"ema.decay", "ema.use_for_samples", "noise_offset", "min_snr_gamma", "prediction_type",
               "zero_terminal_snr", "uncond.enabled", "uncond.p", "uncond.cond", "captions.shuffle_tags",
               "captions.keep_tokens", "captions.tag_dropout", "custom_embeddings.enabled",
               "custom_embeddings.path", "cache.latents", "cache.text_embeddings", "optimizer.fused_backward",
               "weights_dtype"}
    assert options <= {f.key for f in fields.ADVANCED}
    assert options <= set(schema.iter_keys())
    yaml_text = configs.to_yaml(presets.load_preset(presets.list_presets()[0], "/tmp/out"))
    values, _ = configs.form_from_yaml(yaml_text)
    index = [f.key for f in fields.ALL].index("noise_offset")
    values[index] = 0.07
    merged, message = configs.merge_form(yaml_text, values)
    assert merged is not None and schema.from_dict(configs.parse_yaml(merged)).noise_offset == 0.07


def test_the_timestep_range_fields_reach_the_config():
    yaml_text = configs.to_yaml(presets.load_preset(presets.list_presets()[0], "/tmp/out"))
    values, _ = configs.form_from_yaml(yaml_text)
    keys = [f.key for f in fields.ALL]
    values[keys.index("min_timestep")], values[keys.index("max_timestep")] = 200, 800
    merged, message = configs.merge_form(yaml_text, values)
    config = schema.from_dict(configs.parse_yaml(merged))
    assert (config.min_timestep, config.max_timestep) == (200, 800), message
