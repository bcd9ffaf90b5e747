"""One job at a time (a training run or class image generation), and the history of what it reported.

The manager lives in the server process, not in a browser tab: a run started from the page goes on
when the tab is closed, and a reloaded page renders the same history. A drain thread per job moves the
job's events into the history as they arrive, so the history is current even while no page polls it.
Nothing here imports gradio or the heavy engine modules; those load when a job is built.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

TRAIN = "train"
CLASSGEN = "classgen"
JOB_NAMES = {TRAIN: "a training run", CLASSGEN: "class image generation"}
ACTIVE_STATES = ("starting", "running", "stopping")
LOG_LINES = 500


class JobBusy(RuntimeError):
    """A job is already running; its message says which."""


@dataclass
class History:
    kind: str
    label: str = ""
    state: str = "starting"  # starting, running, stopping, finished, stopped, failed
    run_dir: str = ""
    step: int = 0
    start_step: int = 0
    total_steps: int = 0
    epoch: int = 0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    done: int = 0            # progress of jobs counted in items (class images)
    total: int = 0
    points: list = field(default_factory=list)    # {"step", "loss", "lr"} per optimizer step
    validation: list = field(default_factory=list)  # {"step", "loss"} per validation round
    samples: list = field(default_factory=list)   # (step, path)
    images: list = field(default_factory=list)    # paths made by class image generation
    checkpoints: list = field(default_factory=list)
    logs: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    error: str = ""
    user_error: bool = False
    summary: Optional[dict] = None
    started_at: float = field(default_factory=time.time)
    version: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


class JobManager:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: Any = None  # the active job; None once it has ended, so that its model can be freed
        self._current: Optional[History] = None
        self._histories: dict[str, History] = {}
        self._building: Optional[str] = None  # kind of a job being built

    # -- starting and stopping ------------------------------------------------------------------------
    def start(self, kind: str, build: Callable[[queue.Queue], Any], label: str = "") -> History:
        """Build a job with build(event_queue) and start it; raises JobBusy while another job is active.

        build may raise (a config the engine rejects, a missing run folder): nothing is started then and
        the error propagates. It runs outside the lock because it imports the engine, which takes seconds
        that page polls must not wait for.
        """
        with self._lock:
            running = self._building or (self._current.kind if self._current is not None
                                         and self._current.active else None)
            if running:
                raise JobBusy(f"{JOB_NAMES[running].capitalize()} is already running; "
                              "stop it before starting another job.")
            self._building = kind
        events: queue.Queue = queue.Queue()
        try:
            job = build(events)
        except BaseException:
            with self._lock:
                self._building = None
            raise
        with self._lock:
            # Cleared where the job is installed: between two locked blocks another start would pass the
            # busy check.
            self._building = None
            # Versions go on from the previous job's: a page compares them to tell a new history from the one it
            # drew, and a job that fails at once would otherwise repeat the versions of the last one.
            previous = self._histories.get(kind)
            history = History(kind=kind, label=label, version=previous.version + 1 if previous else 0)
            history.logs.append(f"{_stamp()} starting {label or JOB_NAMES[kind]}")
            self._job, self._current = job, history
            self._histories[kind] = history
            try:
                job.start()
            except Exception as error:
                self._fail(history, f"{error.__class__.__name__}: {error}", user_error=False)
                self._job = None
                raise
            threading.Thread(target=self._drain, args=(job, events, history), name=f"scal-gui-{kind}-events",
                             daemon=True).start()
            return history

    def stop(self) -> str:
        with self._lock:
            history = self._current
            if history is None or not history.active:
                return "No job is running."
            if history.state != "stopping":
                history.state = "stopping"
                history.logs.append(f"{_stamp()} stop requested: ending after the current step")
                history.version += 1
                self._job.stop()
        return f"Stopping {JOB_NAMES[history.kind]}…"

    # -- reading --------------------------------------------------------------------------------------
    def snapshot(self, kind: Optional[str] = None) -> Optional[History]:
        """A copy of the newest history of that kind (or of the current job), safe to read unlocked.

        The lists are copied, their items shared: recorded items are never changed, and a deep copy of a
        long run's points on every poll would cost more than drawing them.
        """
        with self._lock:
            history = self._histories.get(kind) if kind else self._current
            if history is None:
                return None
            return dataclasses.replace(history, points=list(history.points), validation=list(history.validation),
                                       samples=list(history.samples),
                                       images=list(history.images), checkpoints=list(history.checkpoints),
                                       logs=deque(history.logs, maxlen=LOG_LINES))

    def version(self, kind: str) -> int:
        """Grows with every change to the history of that kind, across its jobs; -1 before its first job."""
        with self._lock:
            history = self._histories.get(kind)
            return -1 if history is None else history.version

    def state(self, kind: str) -> Optional[str]:
        with self._lock:
            history = self._histories.get(kind)
            return None if history is None else history.state

    def active_run_dir(self) -> Optional[str]:
        """The folder of the training run in progress, once it has one: the run lists mark it running."""
        with self._lock:
            history = self._histories.get(TRAIN)
            return history.run_dir if history is not None and history.active and history.run_dir else None

    # -- events ---------------------------------------------------------------------------------------
    def _drain(self, job: Any, events: queue.Queue, history: History) -> None:
        while True:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                thread = getattr(job, "thread", None)
                if thread is not None and not thread.is_alive() and events.empty():
                    with self._lock:
                        self._fail(history, "the job ended without reporting a result", user_error=False)
                        self._release(job)
                    return
                continue
            with self._lock:
                self._apply(history, event)
                history.version += 1
                if event.kind in ("finished", "failed"):
                    self._release(job)
                    return

    def _release(self, job: Any) -> None:
        """Forget an ended job: it holds the model, which an idle app should not keep in memory."""
        if self._job is job:
            self._job = None

    def _apply(self, history: History, event: Any) -> None:
        kind = event.kind
        if kind == "started":
            history.state = "stopping" if history.state == "stopping" else "running"
            history.run_dir = event.run_dir
            history.total_steps = event.total_steps
            history.start_step = history.step = event.start_step
            history.logs.append(f"{_stamp()} run folder: {event.run_dir}")
        elif kind == "step":
            if history.state == "starting":
                history.state = "running"
            history.step, history.epoch, history.total_steps = event.step, event.epoch, event.total_steps
            history.it_per_s, history.eta_s = event.it_per_s, event.eta_s
            history.points.append({"step": event.step, "loss": event.loss, "lr": event.lr})
        elif kind == "validation":
            history.validation.append({"step": event.step, "loss": event.loss})
        elif kind == "progress":
            if history.state == "starting":
                history.state = "running"
            history.done, history.total, history.eta_s = event.done, event.total, event.eta_s
        elif kind == "sample":
            history.samples += [(event.step, path) for path in event.paths]
            history.logs.append(f"{_stamp()} {len(event.paths)} samples at step {event.step}")
        elif kind == "image":
            history.images.append(event.path)
        elif kind == "checkpoint":
            history.checkpoints.append((event.step, event.path))
            history.logs.append(f"{_stamp()} checkpoint: {event.path}")
        elif kind == "log":
            history.logs.append(f"{_stamp()} {event.level}: {event.message}")
        elif kind == "finished":
            history.state = "stopped" if event.stopped else "finished"
            history.summary = event.summary
            if getattr(event, "run_dir", ""):
                history.run_dir = event.run_dir
            history.eta_s = 0.0
            history.logs.append(f"{_stamp()} {history.state}")
            skipped = (event.summary or {}).get("skipped_reasons", [])
            if skipped:
                history.logs.append(f"{_stamp()} {len(skipped)} images were skipped:")
                history.logs += [f"  {item['path']}: {item['reason']}" for item in skipped]
        elif kind == "failed":
            self._fail(history, event.error, event.user_error)

    @staticmethod
    def _fail(history: History, error: str, user_error: bool) -> None:
        history.state = "failed"
        history.error = error
        history.user_error = user_error
        history.eta_s = 0.0
        history.logs.append(f"{_stamp()} error: {error}")
        history.version += 1
