"""The run queue: kept on disk, moved and cancelled, run one job after another without a page, past a job
that cannot be built, and resumed from its checkpoint after the app's process was killed."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import yaml

from conftest import ROOT
from engine import checkpoints, events
from engine.testing import tiny_config
from scal_gui import configs, job_kinds, tab_queue
from scal_gui.actions import Actions
from scal_gui.jobs import JobManager
from scal_gui.run_queue import QueueKind, RunQueue, queue_file

# few steps, no class images, no samples: what a run needs to leave checkpoints
TINY = {"prior_preservation.enabled": False, "data.concepts[0].class_set": None, "sampling.interval_steps": 0}


class Gate(threading.Event):
    stopped = False


class HeldJob:
    """A job that runs until its gate opens or it is stopped, then finishes."""

    def __init__(self, event_queue, gate):
        self.events, self.gate, self.thread = event_queue, gate, None

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        self.events.put(events.Started(run_dir="held"))
        stopped = not self.gate.wait(30)
        self.events.put(events.Finished(run_dir="held", stopped=stopped or self.gate.stopped))

    def stop(self):
        self.gate.stopped = True
        self.gate.set()


def held_queue(path, gates):
    """A queue over a new manager whose kinds include "hold", a job that ends when gates[its label] is set."""
    def build(entry):
        return lambda event_queue: HeldJob(event_queue, gates.setdefault(entry.label, Gate()))

    return RunQueue(JobManager(), path, {**job_kinds.KINDS, "hold": QueueKind("hold", build)})


def release(gates):
    for label in ("first", "a", "b", "c", "long", "after", "before"):
        gates.setdefault(label, Gate()).set()


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def states(run_queue):
    return [(e.label, e.state) for e in run_queue.entries()]


def tiny_yaml(output_dir, **overrides):
    return configs.to_yaml(tiny_config(output_dir, **{**TINY, **overrides}))


def test_the_queue_is_kept_on_disk_in_order_and_read_back(tmp_path):
    assert queue_file(str(tmp_path / "data" / "datasets")) == tmp_path / "data" / "scal-sdt-queue.json"
    path = queue_file(str(tmp_path / "data" / "datasets"))
    gates = {}
    run_queue = held_queue(path, gates)
    first = run_queue.add("hold", {}, "first")
    assert first.state == "running"  # nothing ran: it started at once
    ids = {label: run_queue.add("hold", {"n": n}, label).id for n, label in enumerate(("a", "b", "c"))}
    assert run_queue.move_up(ids["c"]) == "Moved c up to position 2."
    assert "first in the queue already" in run_queue.move_up(ids["a"])
    assert run_queue.cancel(ids["b"]) == "Cancelled b."
    assert states(run_queue) == [("first", "running"), ("a", "queued"), ("c", "queued"), ("b", "cancelled")]
    # as the Queue tab lists them, and offers them to Cancel and Move up
    assert [row[:4] for row in tab_queue.rows(run_queue.entries())] == [
        ["0", "hold", "first", "running"], ["1", "hold", "a", "queued"], ["2", "hold", "c", "queued"],
        ["", "hold", "b", "cancelled"]]
    assert [label for label, _ in tab_queue.choices(run_queue.entries())] == ["running: first", "1: a", "2: c"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # replaced whole: no temporary file left

    again = held_queue(path, {})  # as a new process reads it, before it goes on
    assert states(again) == states(run_queue)
    assert [(e.id, e.kind, e.spec, e.added_at) for e in again.entries()] == [
        (e.id, e.kind, e.spec, e.added_at) for e in run_queue.entries()]
    assert json.loads(path.read_text())["format"] == 1
    release(gates)
    wait_for(lambda: sorted(s for _, s in states(run_queue)) == ["cancelled", "finished", "finished", "finished"])
    ran = sorted((e for e in run_queue.entries() if e.started_at), key=lambda e: e.started_at)
    assert [e.label for e in ran] == ["first", "a", "c"]


def test_cancelling_the_running_entry_stops_its_job_and_the_next_starts(tmp_path):
    gates = {}
    run_queue = held_queue(tmp_path / "queue.json", gates)
    running = run_queue.add("hold", {}, "long")
    after = run_queue.add("hold", {}, "after")
    assert run_queue.cancel(running.id).startswith("Stopping")
    wait_for(lambda: dict(states(run_queue)) == {"long": "stopped", "after": "running"})
    run_queue.manager.stop()
    wait_for(lambda: dict(states(run_queue))["after"] == "stopped")
    assert "nothing to cancel" in Actions(run_queue.manager, run_queue).cancel_entry(after.id)
    assert Actions(run_queue.manager, run_queue).move_up("nope") == "Error: queue: no entry 'nope'"


def test_queued_jobs_run_in_turn_without_a_page_and_a_failed_build_does_not_stall(tmp_path, tiny_model,
                                                                                   one_torch_thread):
    from engine.run_dir import find_runs

    gates = {}
    run_queue = held_queue(tmp_path / "queue.json", gates)
    actions = Actions(run_queue.manager, run_queue)
    run_queue.add("hold", {}, "before")
    output = tmp_path / "out"
    assert actions.queue_training(tiny_yaml(output, **{"trainer.max_steps": 3})).startswith(
        "Queued training (tiny-demo) at position 1")
    actions.queue_resume(str(tmp_path / "not-a-run"))  # its build fails: Trainer.for_resume refuses the folder
    converted = tmp_path / "tiny.safetensors"
    actions.queue_conversion(str(tiny_model), str(converted), {"unet_dtype": "fp16"})
    actions.queue_training(tiny_yaml(output, **{"trainer.max_steps": 2}))
    assert actions.queue_training("model: [\n").startswith("Not queued: ")  # refused, not queued
    assert [s for _, s in states(run_queue)] == ["running", "queued", "queued", "queued", "queued"]

    release(gates)  # the job before ends: the queue goes on by itself
    wait_for(lambda: all(s not in ("queued", "running") for _, s in states(run_queue)), timeout=120)
    ended = {e.kind: e for e in run_queue.entries()}
    assert [e.state for e in sorted(run_queue.entries(), key=lambda e: e.added_at)] == [
        "finished", "finished", "failed", "finished", "finished"]
    assert "not-a-run" in ended["resume"].error and "not a run folder" in ended["resume"].error
    assert converted.is_file() and converted.stat().st_size > 0
    runs = find_runs(output)
    assert len(runs) == 2
    steps = {e.run_dir: checkpoints.read_meta(checkpoints.latest_checkpoint(e.run_dir))["step"]
             for e in run_queue.entries() if e.kind == "train"}
    assert sorted(steps.values()) == [2, 3] and set(steps) == {str(run.path) for run in runs}


# The app's start as server.py makes it, then (with a config) a run queued, then waiting for the queue.
APP = """
import json, sys, time
from scal_gui import server
from scal_gui.actions import Actions
from scal_gui.jobs import JobManager, TRAIN
manager = JobManager()
actions = Actions(manager, server.open_queue(manager, sys.argv[1]))
if len(sys.argv) > 2:
    print(actions.queue_training(open(sys.argv[2]).read()), flush=True)
while any(e["state"] in ("queued", "running") for e in actions.queue_list()):
    time.sleep(0.1)
history = manager.snapshot(TRAIN)
print(json.dumps({"entries": actions.queue_list(), "start_step": history.start_step, "step": history.step}))
"""


def app(data_dir, *args):
    return subprocess.Popen([sys.executable, "-c", APP, str(data_dir), *map(str, args)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_run_cut_off_by_a_killed_app_resumes_from_its_checkpoint_when_the_app_starts_again(tmp_path,
                                                                                              tiny_model):
    data_dir, output = tmp_path / "data" / "datasets", tmp_path / "out"
    config = tmp_path / "run.yaml"
    max_steps = 60
    config.write_text(yaml.safe_dump(tiny_config(output, **{**TINY, "trainer.max_steps": max_steps,
                                                            "checkpoint.every_n_train_steps": 10})))
    saved = queue_file(str(data_dir))

    def recorded():
        entries = json.loads(saved.read_text())["entries"] if saved.exists() else []
        return entries[0] if entries and entries[0]["run_dir"] else None

    first = app(data_dir, config)
    try:
        wait_for(lambda: recorded() and checkpoints.latest_checkpoint(recorded()["run_dir"]), timeout=90)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    entry = recorded()
    run_dir = entry["run_dir"]
    killed_at = checkpoints.read_meta(checkpoints.latest_checkpoint(run_dir))["step"]
    assert entry["state"] == "running" and 0 < killed_at < max_steps, killed_at

    second = app(data_dir)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    (entry,) = report["entries"]
    assert (entry["state"], entry["run_dir"]) == ("finished", run_dir)
    assert (report["start_step"], report["step"]) == (killed_at, max_steps)
    assert checkpoints.read_meta(checkpoints.latest_checkpoint(run_dir))["step"] == max_steps
    assert len(list((output / "tiny-demo").iterdir())) == 1  # the same run folder, not a new run


def test_a_restart_resumes_a_cut_off_run_only_once_the_process_still_training_it_has_freed_its_folder(tmp_path):
    path, folder = tmp_path / "queue.json", tmp_path / "run"
    folder.mkdir()
    killed_gates, gates = {}, {}
    killed_app = held_queue(path, killed_gates)
    killed_app.add("hold", {}, "cut off")
    wait_for(lambda: killed_app.entries()[0].run_dir)
    kept = json.loads(path.read_text())
    kept["entries"][0]["run_dir"] = str(folder)  # as the killed app left it: running, in that folder
    path.write_text(json.dumps(kept))
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from engine.run_dir import RunLock; "
                               f"lock = RunLock.acquire({str(folder)!r}); print('held', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        restarted = held_queue(path, gates)
        restarted.restart()
        time.sleep(1.5)
        assert states(restarted) == [("cut off", "queued")] and not restarted.manager.busy()
    finally:
        holder.communicate("")  # the old run has saved its checkpoint and ends: the folder is free
        release(killed_gates)
    wait_for(lambda: states(restarted) == [("cut off", "running")], timeout=10)
    gates["cut off"].set()
    wait_for(lambda: states(restarted) == [("cut off", "finished")])


def test_a_queue_file_that_does_not_load_is_set_aside_with_a_warning(tmp_path):
    path = tmp_path / "scal-sdt-queue.json"
    path.write_text('{"format": 1, "entries": [{"id": "x"}]}')  # an entry without its kind
    gates = {}
    run_queue = held_queue(path, gates)
    assert run_queue.entries() == [] and not path.exists()
    (aside,) = tmp_path.glob("scal-sdt-queue.json.unreadable-*")
    assert str(path) in run_queue.warning and str(aside) in run_queue.warning
    run_queue.add("hold", {}, "first")
    assert [e["label"] for e in json.loads(path.read_text())["entries"]] == ["first"]
    release(gates)
