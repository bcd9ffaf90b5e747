"""Training on several devices from the app: a torchrun child process whose events reach the job history."""
import json
import queue
import subprocess
import sys
import time

import pytest

from conftest import ROOT, abort_children, innermost_frames
from engine import distributed, events
from engine.errors import UserError
from engine.testing import tiny_config
from scal_gui import configs, fields, multi_device
from scal_gui.actions import Actions
from scal_gui.child_job import ChildTraining
from scal_gui.jobs import TRAIN, JobManager

# Two CPU processes with gloo, one image per process and step, no class images to generate first.
TWO_CPUS = {"trainer.devices": 2, "batch_size": 1, "data.concepts[0].class_set.auto_generate.enabled": False}


@pytest.fixture
def spawned(monkeypatch):
    """The child jobs the actions build, to check that none is left running."""
    jobs = []
    build = multi_device.torchrun_training

    def recording(*args, **kwargs):
        jobs.append(build(*args, **kwargs))
        return jobs[-1]

    monkeypatch.setattr(multi_device, "torchrun_training", recording)
    yield jobs
    for job in jobs:
        if job.process.poll() is None:
            # the child's error output (a file the job closes once the child ends), opened again through /proc
            with open(f"/proc/{job.process.pid}/fd/2", "rb") as stderr:
                abort_children(job.process.pid)  # the ranks print where they were and die; torchrun then ends
                job.process.wait(60)
                output = stderr.read().decode("utf-8", "replace")
            pytest.fail(f"a training child process was left running; its output:\n{output[-8000:]}\n"
                        f"its ranks' innermost frames:\n{innermost_frames(output)}")


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_two_cpu_processes_stream_a_run_into_the_history(tmp_path, class_images, spawned):
    actions = Actions(JobManager())
    settings = {**TWO_CPUS, "trainer.max_steps": 4, "sampling.interval_steps": 2, "checkpoint.every_n_train_steps": 2}
    message = actions.start_training(configs.to_yaml(tiny_config(tmp_path, **settings)))
    assert message == "Started training (tiny-demo).", message
    assert wait_for(lambda: not actions.manager.snapshot().active, 120)

    history = actions.manager.snapshot(TRAIN)
    assert history.state == "finished", history.error
    assert [point["step"] for point in history.points] == [1, 2, 3, 4]
    (run_dir,) = (tmp_path / "tiny-demo").iterdir()
    assert history.run_dir == str(run_dir)
    assert [step for step, _ in history.checkpoints] == [2, 4]
    assert all(path.startswith(str(run_dir)) for _, path in history.checkpoints)
    assert {step for step, _ in history.samples} == {2, 4}
    assert history.summary["steps"] == 4
    assert spawned[0].process.returncode == 0 and not spawned[0].files[0].exists()


def test_stop_ends_the_processes_with_a_checkpoint_and_resume_goes_on(tmp_path, class_images, spawned):
    actions = Actions(JobManager())
    settings = {**TWO_CPUS, "trainer.max_steps": 100000, "sampling.interval_steps": 0,
                "checkpoint.every_n_train_steps": 100000}
    actions.start_training(configs.to_yaml(tiny_config(tmp_path, **settings)))
    assert wait_for(lambda: actions.manager.snapshot(TRAIN).points, 120), actions.manager.snapshot(TRAIN).logs
    actions.stop()
    assert wait_for(lambda: not actions.manager.snapshot().active, 120)

    history = actions.manager.snapshot(TRAIN)
    assert history.state == "stopped", history.error
    (run_dir,) = (tmp_path / "tiny-demo").iterdir()
    ((stopped_at, checkpoint),) = history.checkpoints
    assert stopped_at >= history.points[0]["step"] and checkpoint.startswith(str(run_dir / "checkpoints"))

    assert actions.resume_training(str(run_dir)).startswith("Started")
    assert wait_for(lambda: actions.manager.snapshot(TRAIN).points, 120), actions.manager.snapshot(TRAIN).logs
    actions.stop()
    assert wait_for(lambda: not actions.manager.snapshot().active, 120)
    resumed = actions.manager.snapshot(TRAIN)
    assert resumed.state == "stopped" and resumed.start_step == stopped_at
    assert resumed.points[0]["step"] == stopped_at + 1
    assert len(spawned) == 2 and len(list((tmp_path / "tiny-demo").iterdir())) == 1


# -- the child process protocol, with stand-in children --------------------------------------------------
def child(code, event_queue, **kwargs):
    return ChildTraining([sys.executable, "-c", code], event_queue, **kwargs)


def test_a_child_that_dies_without_a_result_shows_its_error_output():
    manager = JobManager()
    code = ("import json, sys; print(json.dumps({'kind': 'started', 'run_dir': 'r', 'total_steps': 9, "
            "'start_step': 0})); print('not an event'); sys.stderr.write('Traceback: boom'); sys.exit(3)")
    manager.start(TRAIN, lambda q: child(code, q))
    assert wait_for(lambda: not manager.snapshot().active, 30)
    history = manager.snapshot(TRAIN)
    assert history.state == "failed" and history.run_dir == "r"
    assert "exited with code 3" in history.error and history.error.endswith("Traceback: boom")
    assert any(line.endswith("not an event") for line in history.logs)


def test_a_child_that_ignores_the_stop_is_terminated_after_the_grace_period():
    code = ("import json, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "print(json.dumps({'kind': 'step', 'step': 1, 'total_steps': 9}), flush=True); time.sleep(20)")
    job = child(code, queue.Queue(), stop_grace_s=0.5)
    job.start()
    assert isinstance(job.events.get(timeout=30), events.Step)
    started = time.monotonic()
    job.stop()
    job.join(10)
    assert not job.thread.is_alive() and time.monotonic() - started < 5
    assert job.process.returncode != 0
    assert isinstance(job.result, events.Finished) and job.result.stopped and job.result.step == 1


def test_the_finished_event_waits_for_the_child_to_exit():
    code = ("import json, time; print(json.dumps({'kind': 'finished', 'run_dir': 'r', 'step': 2}), flush=True); "
            "time.sleep(1)")
    job = child(code, queue.Queue())
    job.start()
    assert isinstance(job.events.get(timeout=30), events.Finished)
    assert job.process.poll() is not None


def test_closing_the_app_stops_a_running_child(tmp_path):
    flag = tmp_path / "interrupted"
    code = (f"import json, pathlib, signal, sys, time; signal.signal(signal.SIGINT, lambda *_: "
            f"pathlib.Path({str(flag)!r}).touch() or sys.exit(130)); "
            "print(json.dumps({'kind': 'step', 'step': 1}), flush=True); time.sleep(20)")
    app = ("import queue, sys; from scal_gui.child_job import ChildTraining; events = queue.Queue(); "
           f"job = ChildTraining([sys.executable, '-c', {code!r}], events); job.start(); events.get(timeout=30)")
    result = subprocess.run([sys.executable, "-c", app], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert wait_for(flag.exists, 10)


def test_events_survive_the_json_round_trip():
    made = [events.Started(run_dir="r", total_steps=4), events.Step(step=1, loss=0.5, lr=1e-4),
            events.Progress(done=1, total=2), events.Sample(step=2, paths=["a.png"]), events.Image(path="i.png"),
            events.Validation(step=2, loss=0.25, per_timestep={"100": 0.3, "900": 0.2}),
            events.CheckpointSaved(step=2, path="c"), events.Log(level="warning", message="m"),
            events.Finished(run_dir="r", step=2, stopped=True, summary={"steps": 2}),
            events.Failed(error="e", user_error=True)]
    assert {type(e) for e in made} == set(events.Event.__subclasses__())
    for event in made:
        assert events.event_from_dict(json.loads(json.dumps(event.to_dict()))) == event
    with pytest.raises(ValueError, match="unknown event kind"):
        events.event_from_dict({"kind": "nonsense"})
    with pytest.raises(ValueError, match="step event"):
        events.event_from_dict({"kind": "step", "rank": 1})


# -- the devices setting ----------------------------------------------------------------------------------
def test_the_form_edits_the_number_of_devices():
    spec = next(f for f in fields.TRAIN if f.key == "trainer.devices")
    assert spec.kind == "int" and spec.default == 1
    index = {f.key: i for i, f in enumerate(fields.ALL)}
    values = fields.form_values({}, fields.ALL)
    values[index["trainer.devices"]] = 2
    merged, _ = configs.merge_form(configs.to_yaml({"model": "m"}), values)
    assert configs.parse_yaml(merged)["trainer"] == {"devices": 2}


def test_devices_become_a_process_count(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert [distributed.process_count(n) for n in (1, 2, 3, -1)] == [1, 2, 3, 1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [distributed.process_count(n) for n in (1, 2, -1)] == [1, 2, 4]
    for wrong in (0, -2, "auto", [0, 1], True, 8):
        with pytest.raises(UserError, match="trainer.devices"):
            distributed.process_count(wrong)
