"""A job that does not end after Stop: a thread is abandoned, a child process killed, and the app takes new work."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import events
from scal_gui import live, tab_train  # noqa: F401  (tab_train: the page's name for the state)
from scal_gui.child_job import ChildTraining
from scal_gui.jobs import CLASSGEN, STOP_BOUND_S, TRAIN, JobBusy, JobManager

BOUND = 0.5


class StuckJob:
    """Reports a start (unless stuck_starting), then blocks on `release`, which no stop sets: a read of a named
    pipe, or any call that never returns. Once released it reports a step and its end, late."""

    def __init__(self, event_queue, release, stuck_starting=False):
        self.events, self.release, self.stuck_starting = event_queue, release, stuck_starting
        self.thread = None
        self.stop_calls = 0

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        if not self.stuck_starting:
            self.events.put(events.Started(run_dir="stuck-run", total_steps=9))
        self.release.wait()
        self.events.put(events.Step(step=7, epoch=3, loss=9.0, lr=1.0, it_per_s=1.0, eta_s=1.0, total_steps=9))
        self.events.put(events.Log(message="late line from the abandoned job"))
        self.events.put(events.Finished(run_dir="stuck-run", step=7, stopped=True))

    def stop(self):
        self.stop_calls += 1


class QuickJob:
    def __init__(self, event_queue):
        self.events, self.thread = event_queue, None

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        self.events.put(events.Started(run_dir="new-run", total_steps=2))
        self.events.put(events.Step(step=1, epoch=0, loss=0.5, lr=1e-4, it_per_s=2.0, eta_s=0.5, total_steps=2))
        self.events.put(events.Finished(run_dir="new-run", step=1))

    def stop(self):
        pass


def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def release():
    """The stuck job's release, set at cleanup so that no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def start_stuck(manager, release, **kwargs):
    built = []

    def build(event_queue):
        built.append(StuckJob(event_queue, release, **kwargs))
        return built[-1]

    manager.start(TRAIN, build, "stuck")
    return built[0]


def test_the_bound_is_a_minute_by_default_and_set_per_manager():
    assert STOP_BOUND_S == 60.0 and JobManager().stop_bound_s == 60.0
    assert JobManager(stop_bound_s=BOUND).stop_bound_s == BOUND


@pytest.mark.parametrize("new_kind", [TRAIN, CLASSGEN])
def test_a_thread_that_does_not_stop_is_abandoned_and_new_work_starts(release, new_kind):
    manager = JobManager(stop_bound_s=BOUND)
    stuck = start_stuck(manager, release)
    assert wait_for(lambda: manager.state(TRAIN) == "running", 5)
    assert manager.stop().startswith("Stopping")
    stopped_at = time.monotonic()
    assert stuck.stop_calls == 1 and manager.state(TRAIN) == "stopping"
    with pytest.raises(JobBusy):  # still "one job at a time" within the bound
        manager.start(new_kind, QuickJob)

    assert wait_for(lambda: manager.state(TRAIN) != "stopping", 5), "the stuck job was never abandoned"
    waited = time.monotonic() - stopped_at
    assert BOUND <= waited < BOUND + 1.5
    abandoned = manager.snapshot(TRAIN)
    assert abandoned.state == "abandoned" and not abandoned.active
    assert "\n" not in abandoned.error
    assert f"did not stop within {BOUND:g} s" in abandoned.error and "cannot be killed" in abandoned.error
    assert "until the app restarts" in abandoned.error
    assert any("abandoned" in line for line in abandoned.logs)
    assert manager.active_run_dir() is None  # the run lists no longer mark it running
    assert manager.stop() == "No job is running."
    assert stuck.thread.is_alive()  # a thread cannot be killed: it is only let go

    # The app takes new work, which runs to its end as usual.
    manager.start(new_kind, QuickJob, "new")
    assert wait_for(lambda: not manager.snapshot().active, 5)
    new = manager.snapshot(new_kind)
    assert new.state == "finished" and new.label == "new" and new.run_dir == "new-run"
    assert [point["step"] for point in new.points] == [1]
    before = {kind: manager.snapshot(kind) for kind in (TRAIN, CLASSGEN)}

    # The stuck thread ends at last and reports: it changes nothing, neither the new job's history nor its own.
    release.set()
    stuck.thread.join(5)
    assert not stuck.thread.is_alive()
    time.sleep(0.6)  # longer than a drain's poll
    for kind, earlier in before.items():
        now = manager.snapshot(kind)
        if earlier is None:
            assert now is None
            continue
        assert (now.state, now.version, now.step, now.points, now.run_dir, list(now.logs), now.error) == (
            earlier.state, earlier.version, earlier.step, earlier.points, earlier.run_dir, list(earlier.logs),
            earlier.error), kind
    if new_kind == CLASSGEN:
        assert manager.state(TRAIN) == "abandoned"
    assert manager.snapshot().label == "new" and manager.snapshot().state == "finished"
    assert not any("late line" in line for kind in before if before[kind] for line in manager.snapshot(kind).logs)
    assert manager._job is None


def test_a_job_stuck_while_starting_is_abandoned_too(release):
    manager = JobManager(stop_bound_s=BOUND)
    start_stuck(manager, release, stuck_starting=True)
    time.sleep(0.3)
    assert manager.state(TRAIN) == "starting"
    manager.stop()
    assert wait_for(lambda: manager.state(TRAIN) != "stopping", 5)
    assert manager.state(TRAIN) == "abandoned"
    manager.start(CLASSGEN, QuickJob)
    assert wait_for(lambda: manager.state(CLASSGEN) == "finished", 5)


def test_a_job_that_ends_within_the_bound_is_not_abandoned(release):
    manager = JobManager(stop_bound_s=BOUND)
    stuck = start_stuck(manager, release)
    assert wait_for(lambda: manager.state(TRAIN) == "running", 5)
    manager.stop()
    release.set()  # it ends just after Stop, as a job at its stop check does
    stuck.thread.join(5)
    assert wait_for(lambda: manager.state(TRAIN) != "stopping", 5)
    time.sleep(BOUND + 0.3)  # past the deadline: nothing overrides the outcome it reported
    history = manager.snapshot(TRAIN)
    assert history.state == "stopped" and history.step == 7 and not history.error


def test_the_page_names_an_abandoned_job(release):
    manager = JobManager(stop_bound_s=BOUND)
    start_stuck(manager, release)
    assert wait_for(lambda: manager.state(TRAIN) == "running", 5)
    stopping = manager.stop()
    assert wait_for(lambda: manager.state(TRAIN) == "abandoned", 5)
    history = manager.snapshot(TRAIN)
    assert live.status_line(history, "").startswith("**Abandoned** stuck")
    assert "Error: the job did not stop within" in live.status_line(history, "")
    assert live.settled_message(stopping, history).startswith("**Abandoned** stuck")
    assert "did not stop within" in live.settled_message(stopping, history)
    assert "did not stop within" in live.log_text(history)
    assert 'data-state="abandoned"' in live.train_progress(history)


# -- a child process ------------------------------------------------------------------------------------
IGNORE = "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); "


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie whose parent has not reaped it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(), reason="process groups, /proc")
def test_a_child_that_ignores_sigterm_is_killed_within_the_bound():
    # The child ignores SIGINT (the stop) and SIGTERM (after its grace), as does a worker it started; the
    # worker keeps the event pipe open, so killing the child alone (its own grace's last step) ends nothing.
    worker = f"import signal, time; {IGNORE}time.sleep(60)"
    code = (f"import json, signal, subprocess, sys, time; {IGNORE}"
            f"worker = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
            "print(json.dumps({'kind': 'started', 'run_dir': '', 'total_steps': 9, 'start_step': 0}), flush=True); "
            "print(json.dumps({'kind': 'log', 'message': f'worker {worker.pid}'}), flush=True); time.sleep(60)")
    manager = JobManager(stop_bound_s=BOUND)
    built = []

    def build(event_queue):
        built.append(ChildTraining([sys.executable, "-c", code], event_queue, stop_grace_s=0.2))
        return built[-1]

    manager.start(TRAIN, build, "child")
    assert wait_for(lambda: any("worker " in line for line in manager.snapshot(TRAIN).logs), 15)
    (line,) = [line for line in manager.snapshot(TRAIN).logs if "worker " in line]
    worker_pid, child = int(line.rsplit(" ", 1)[1]), built[0]
    time.sleep(0.3)  # the child has set its signal handlers before it printed, the worker by now
    manager.stop()
    stopped_at = time.monotonic()
    assert wait_for(lambda: not manager.snapshot(TRAIN).active, 5), "the child was never killed"
    # its grace (0.2 s), the bound, and one drain poll
    assert time.monotonic() - stopped_at < 0.2 + BOUND + 1.5
    history = manager.snapshot(TRAIN)
    assert history.state == "stopped", (history.state, history.error)
    assert any("killed (SIGKILL)" in line and f"within {0.2 + BOUND:g} s" in line for line in history.logs)
    assert wait_for(lambda: gone(worker_pid) and child.process.poll() is not None, 5)
    assert child.process.returncode != 0
    manager.start(CLASSGEN, QuickJob)  # free again
    assert wait_for(lambda: manager.state(CLASSGEN) == "finished", 5)
