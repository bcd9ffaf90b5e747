"""One job at a time (a training run, class image generation, a conversion), and the history of what it
reported.

The manager lives in the server process, not in a browser tab: a run started from the page goes on
when the tab is closed, and a reloaded page renders the same history. A drain thread per job moves the
job's events into the history as they arrive, so the history is current even while no page polls it.
Listeners hear when a job's run folder becomes known and when it ends (the run queue starts the next
entry then). Nothing here imports gradio or the heavy engine modules; those load when a job is built.
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
CONVERT = "convert"
CAPTION = "caption"
JOB_NAMES = {TRAIN: "a training run", CLASSGEN: "class image generation", CONVERT: "a conversion",
             CAPTION: "captioning"}
ACTIVE_STATES = ("starting", "running", "stopping")
LOG_LINES = 500
# How long a stopped job may take to end before the app gives up on it: a thread is abandoned (it cannot be
# killed), a child process is killed. A child's own stop grace (its checkpoint) comes before this.
STOP_BOUND_S = 60.0
# How long a killed child's job may take to report its end before it is abandoned too.
KILL_WAIT_S = 5.0


class JobBusy(RuntimeError):
    """A job is already running; its message says which."""


def job_name(kind: str) -> str:
    """How messages name a job of that kind; a kind added without a name is named by its key."""
    return JOB_NAMES.get(kind, f"a {kind} job")


@dataclass
class History:
    kind: str
    label: str = ""
    state: str = "starting"  # starting, running, stopping, finished, stopped, failed, abandoned
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
    tag: str = ""               # what the starter named the job by (the run queue: its entry's id)
    started_at: float = field(default_factory=time.time)
    version: int = 0
    stop_deadline: float = 0.0  # time.monotonic() past which a job asked to stop is killed or abandoned
    killed: bool = False        # its processes were killed at the deadline

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


class JobManager:
    def __init__(self, stop_bound_s: float = STOP_BOUND_S) -> None:
        # How long after Stop a job that has not ended is killed or abandoned (see STOP_BOUND_S); tests shorten it.
        self.stop_bound_s = stop_bound_s
        self._lock = threading.Lock()
        self._job: Any = None  # the active job; None once it has ended, so that its model can be freed
        self._current: Optional[History] = None
        self._histories: dict[str, History] = {}
        self._building: Optional[str] = None  # kind of a job being built
        self._listeners: list[Callable[[Optional[History]], None]] = []

    def add_listener(self, listener: Callable[[Optional[History]], None]) -> None:
        """Call listener(copy of a history) when a job's run folder becomes known and when the job ends, and
        listener(None) when a start failed before its job existed (the manager is free again). Listeners are
        called outside the lock, from the thread that saw the change: they may start the next job."""
        self._listeners.append(listener)

    # -- starting and stopping ------------------------------------------------------------------------
    def start(self, kind: str, build: Callable[[queue.Queue], Any], label: str = "", tag: str = "") -> History:
        """Build a job with build(event_queue) and start it; raises JobBusy while another job is active.
        tag is kept in its history, for whoever started it to recognise it by.

        build may raise (a config the engine rejects, a missing run folder): nothing is started then and
        the error propagates. It runs outside the lock because it imports the engine, which takes seconds
        that page polls must not wait for.
        """
        with self._lock:
            running = self._building or (self._current.kind if self._current is not None
                                         and self._current.active else None)
            if running:
                raise JobBusy(f"{job_name(running).capitalize()} is already running; "
                              "stop it before starting another job.")
            self._building = kind
        events: queue.Queue = queue.Queue()
        try:
            job = build(events)
        except BaseException:
            with self._lock:
                self._building = None
            self._tell(None)
            raise
        with self._lock:
            # Cleared where the job is installed: between two locked blocks another start would pass the
            # busy check.
            self._building = None
            # Versions go on from the previous job's: a page compares them to tell a new history from the one it
            # drew, and a job that fails at once would otherwise repeat the versions of the last one.
            previous = self._histories.get(kind)
            history = History(kind=kind, label=label, tag=tag, version=previous.version + 1 if previous else 0)
            history.logs.append(f"{_stamp()} starting {label or job_name(kind)}")
            self._job, self._current = job, history
            self._histories[kind] = history
            try:
                job.start()
            except Exception as error:
                self._fail(history, f"{error.__class__.__name__}: {error}", user_error=False)
                self._job = None
                failure, ended = error, self._copy(history)
            else:
                threading.Thread(target=self._drain, args=(job, events, history), name=f"scal-gui-{kind}-events",
                                 daemon=True).start()
                return history
        self._tell(ended)
        raise failure

    def stop(self) -> str:
        job = None
        with self._lock:
            history = self._current
            if history is None or not history.active:
                return "No job is running."
            if history.state != "stopping":
                history.state = "stopping"
                history.logs.append(f"{_stamp()} stop requested: ending after the current step")
                history.version += 1
                job = self._job
                # The job's own stop grace (a child's time to save its checkpoint) comes before the bound.
                grace = getattr(job, "stop_grace_s", 0.0) or 0.0
                history.stop_deadline = time.monotonic() + grace + self.stop_bound_s
        if job is not None:
            # Outside the lock: a job whose stop() never returned would otherwise hang every page poll.
            job.stop()
        return f"Stopping {job_name(history.kind)}…"

    # -- reading --------------------------------------------------------------------------------------
    def snapshot(self, kind: Optional[str] = None) -> Optional[History]:
        """A copy of the newest history of that kind (or of the current job), safe to read unlocked."""
        with self._lock:
            history = self._histories.get(kind) if kind else self._current
            return None if history is None else self._copy(history)

    @staticmethod
    def _copy(history: History) -> History:
        """A copy to read unlocked; called locked. The lists are copied, their items shared: recorded items are
        never changed, and a deep copy of a long run's points on every poll would cost more than drawing them."""
        return dataclasses.replace(history, points=list(history.points), validation=list(history.validation),
                                   samples=list(history.samples),
                                   images=list(history.images), checkpoints=list(history.checkpoints),
                                   logs=deque(history.logs, maxlen=LOG_LINES))

    def busy(self) -> bool:
        """Whether a job is being built or is active: a start now would be refused."""
        with self._lock:
            return bool(self._building) or (self._current is not None and self._current.active)

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
        told_run_dir, told_end = "", False
        while True:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                event = None
            with self._lock:
                done = self._take(job, events, history, event)
                news = None
                if history.run_dir != told_run_dir or (not history.active and not told_end):
                    told_run_dir, told_end = history.run_dir, not history.active
                    news = self._copy(history)
            if news is not None:
                self._tell(news)
            if done:
                return

    def _tell(self, history: Optional[History]) -> None:
        """Call the listeners, unlocked; one that raises is named in the job's log and the job goes on."""
        for listener in self._listeners:
            try:
                listener(history)
            except Exception as error:
                with self._lock:
                    target = self._histories.get(history.kind) if history is not None else None
                    if target is not None:
                        target.logs.append(f"{_stamp()} error: {listener!r} failed: "
                                           f"{error.__class__.__name__}: {error}")
                        target.version += 1

    def _take(self, job: Any, events: queue.Queue, history: History, event: Any) -> bool:
        """Record one event (None: none came in time) in the history; True once nothing more will come.
        Called locked."""
        if history.state == "abandoned":
            # Final: what the job still reports is dropped (it is another history's turn now), until
            # its thread ends at last, if ever.
            thread = getattr(job, "thread", None)
            return (event is not None and event.kind in ("finished", "failed")) or thread is None or (
                event is None and not thread.is_alive() and events.empty())
        if event is None:
            thread = getattr(job, "thread", None)
            if thread is not None and not thread.is_alive() and events.empty():
                self._fail(history, "the job ended without reporting a result", user_error=False)
                self._release(job)
                return True
            self._enforce_stop(job, history)
            return False
        self._apply(history, event)
        history.version += 1
        if event.kind in ("finished", "failed"):
            self._release(job)
            return True
        self._enforce_stop(job, history)
        return False

    def _enforce_stop(self, job: Any, history: History) -> None:
        """Past the deadline of a Stop, kill the job's processes (a child job, once), or abandon the job (a
        thread, which cannot be killed, or a killed child that still does not end). Called locked."""
        if history.state != "stopping" or not history.stop_deadline or time.monotonic() < history.stop_deadline:
            return
        waited = self.stop_bound_s + (getattr(job, "stop_grace_s", 0.0) or 0.0)
        kill = getattr(job, "kill", None)
        if kill is not None and not history.killed:
            history.killed = True
            history.stop_deadline = time.monotonic() + min(KILL_WAIT_S, self.stop_bound_s)
            history.logs.append(f"{_stamp()} the job did not stop within {waited:g} s of Stop: its processes "
                                "were killed (SIGKILL); what they had not saved is lost")
            history.version += 1
            try:
                kill()
            except Exception as error:  # it is abandoned at the next deadline
                history.logs.append(f"{_stamp()} killing it failed: {error.__class__.__name__}: {error}")
            return
        if history.killed:
            message = (f"the job's processes were killed {waited:g} s after Stop but it did not end within "
                       f"{min(KILL_WAIT_S, self.stop_bound_s):g} s more; it was abandoned and new jobs can start")
        else:
            message = (f"the job did not stop within {waited:g} s of Stop and was abandoned: a thread cannot be "
                       "killed, so it may keep its memory (GPU memory too) and CPU until the app restarts; "
                       "new jobs can start")
        self._end(history, "abandoned", message, False)
        self._release(job)

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
    def _end(history: History, state: str, error: str, user_error: bool) -> None:
        """A final state with its reason (failed: the error; abandoned: why the job was given up)."""
        history.state = state
        history.error = error
        history.user_error = user_error
        history.eta_s = 0.0
        history.logs.append(f"{_stamp()} {'error' if state == 'failed' else state}: {error}")
        history.version += 1

    @classmethod
    def _fail(cls, history: History, error: str, user_error: bool) -> None:
        cls._end(history, "failed", error, user_error)
