"""The run queue: jobs waiting their turn behind the one that runs, kept on disk so that they outlive a closed
tab and an app restart.

Each entry holds what rebuilds its job in a new process (a config's YAML text, a run folder, a conversion's
paths and options), its state (queued, running, finished, failed, stopped, cancelled), the run folder once the
job names one, and its times. The queue is one JSON file, replaced whole on every change (write, then
os.replace). When the job that runs ends (the manager's listener), the next queued entry starts; an entry
whose job cannot be built is failed with its reason and the next one starts. An entry still marked running
when the app starts was cut off by the previous process's end: `restart` queues it first again, and a
training run that saved a checkpoint resumes from it (job_kinds) once no process trains its folder any more
(a multi-GPU run's child stops with a checkpoint when the app that read it is gone).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from engine.errors import UserError
from engine.run_dir import RunLock

from .datasets import default_data_dir
from .jobs import History, JobBusy, JobManager

QUEUED, RUNNING, FINISHED, FAILED, STOPPED, CANCELLED = (
    "queued", "running", "finished", "failed", "stopped", "cancelled")
WAITING = (QUEUED, RUNNING)
# The final state of an entry for the final state of its job's history (an abandoned job was stopped).
FROM_HISTORY = {"finished": FINISHED, "failed": FAILED, "stopped": STOPPED, "abandoned": STOPPED}
FILE_NAME = "scal-sdt-queue.json"
FORMAT = 1
KEEP_ENDED = 50  # ended entries kept for the list, newest; older ones are dropped
# How long a restart waits for a cut-off run's folder to be freed by the process that trained it: a multi-GPU
# run outlives its killed app until it has saved its stop checkpoint (engine.cli), as long as a Stop takes.
FREED_WAIT_S = 300.0


def queue_file(data_dir: Optional[str] = None) -> Path:
    """Where the queue is kept: beside the data folder of uploaded datasets (`--data-dir`, by default
    `$XDG_DATA_HOME/scal-sdt/datasets`), so the default is `$XDG_DATA_HOME/scal-sdt/scal-sdt-queue.json`."""
    return Path(data_dir or default_data_dir()).parent / FILE_NAME


@dataclass
class Entry:
    id: str
    kind: str                  # a key of the queue's kinds: how its job is built
    label: str
    spec: dict                 # what the kind's builder needs, as JSON values
    state: str = QUEUED
    run_dir: str = ""
    error: str = ""            # why it failed (one line), or how it was given up
    added_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    ended_at: float = 0.0


@dataclass(frozen=True)
class QueueKind:
    """How entries of one kind run: the manager's job kind, and build(entry) -> the manager's builder,
    build(event_queue) -> job. build may raise for an entry that cannot run (UserError: a message for the
    user); it runs unlocked and may import the engine."""
    job: str
    build: Callable[[Entry], Callable]


def one_line(error: BaseException) -> str:
    """A failure as the list shows it: a user's mistake as its message, an engine fault with its class."""
    text = str(error) if isinstance(error, UserError) else f"{error.__class__.__name__}: {error}"
    return (text.strip().splitlines() or [error.__class__.__name__])[0]


class QueueError(UserError):
    """A queue operation refused: an unknown entry, or one that cannot take it."""


class RunQueue:
    def __init__(self, manager: JobManager, path: Optional[Path], kinds: dict[str, QueueKind]):
        """path None: kept in memory only. A file that does not load is set aside (`warning` says where) and
        the queue starts empty."""
        self.manager = manager
        self.path = Path(path) if path is not None else None
        self.kinds = kinds
        self.warning = ""
        self._lock = threading.Lock()
        self._version = 0
        self._entries: list[Entry] = self._load()
        manager.add_listener(self._job_changed)

    # -- the file ----------------------------------------------------------------------------------------
    def _load(self) -> list[Entry]:
        if self.path is None or not self.path.exists():
            return []
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("format") != FORMAT:
                raise ValueError(f"format {saved.get('format')!r}, expected {FORMAT}")
            return [Entry(**values) for values in saved["entries"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            problem = f"the run queue {self.path} could not be read ({error.__class__.__name__}: {error})"
        aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except OSError as error:
            self.warning = f"{problem}, nor set aside ({error.strerror}): the queue is kept in memory only"
            self.path = None
        else:
            self.warning = f"{problem}; it was set aside as {aside} and the queue starts empty"
        return []

    def _save(self) -> None:
        """Write the entries (called locked): a temporary file replaces the queue, so a process killed while
        writing leaves the previous queue whole."""
        self._version += 1
        ended = [e for e in self._entries if e.state not in WAITING]
        for old in ended[:-KEEP_ENDED]:
            self._entries.remove(old)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.tmp")
        text = json.dumps({"format": FORMAT, "entries": [dataclasses.asdict(e) for e in self._entries]}, indent=1)
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, self.path)

    # -- operations --------------------------------------------------------------------------------------
    def add(self, kind: str, spec: dict, label: str) -> Entry:
        """Queue a job at the end; it starts at once when nothing runs. Returns a copy of its entry as it is
        after that start (running, or failed with the reason it could not start)."""
        if kind not in self.kinds:
            raise QueueError(f"queue: unknown kind {kind!r}; known: {', '.join(sorted(self.kinds))}")
        entry = Entry(id=uuid.uuid4().hex[:12], kind=kind, label=label, spec=dict(spec))
        with self._lock:
            self._entries.append(entry)
            self._save()
        self.dispatch()
        with self._lock:
            return dataclasses.replace(entry)

    def cancel(self, entry_id: str) -> str:
        """Take a queued entry out of the queue, or stop the running one's job (the entry ends stopped)."""
        with self._lock:
            entry = self._find(entry_id)
            if entry.state == QUEUED:
                entry.state, entry.ended_at = CANCELLED, time.time()
                self._save()
                return f"Cancelled {entry.label}."
            if entry.state != RUNNING:
                raise QueueError(f"queue: {entry.label} has ended ({entry.state}); there is nothing to cancel")
        current = self.manager.snapshot()
        if current is None or current.tag != entry_id or not current.active:
            return f"{entry.label} is starting; cancel it again once it runs."
        return self.manager.stop()

    def move_up(self, entry_id: str) -> str:
        """Swap a queued entry with the queued entry before it."""
        with self._lock:
            entry = self._find(entry_id)
            if entry.state != QUEUED:
                raise QueueError(f"queue: {entry.label} is {entry.state}; only a queued entry can move")
            queued = [i for i, e in enumerate(self._entries) if e.state == QUEUED]
            at = queued.index(self._entries.index(entry))
            if at == 0:
                return f"{entry.label} is first in the queue already."
            before = queued[at - 1]
            here = queued[at]
            self._entries[before], self._entries[here] = self._entries[here], self._entries[before]
            self._save()
            return f"Moved {entry.label} up to position {at}."

    def entries(self) -> list[Entry]:
        """Copies of the entries: running and queued ones in the order they run, then ended ones, newest
        first."""
        with self._lock:
            waiting = [e for e in self._entries if e.state == RUNNING] + [
                e for e in self._entries if e.state == QUEUED]
            ended = sorted((e for e in self._entries if e.state not in WAITING), key=lambda e: e.ended_at,
                           reverse=True)
            return [dataclasses.replace(e, spec=dict(e.spec)) for e in waiting + ended]

    def version(self) -> int:
        """Grows with every change to the entries: a page redraws the list when it differs from what it drew."""
        with self._lock:
            return self._version

    def _find(self, entry_id: str) -> Entry:
        for entry in self._entries:
            if entry.id == entry_id:
                return entry
        raise QueueError(f"queue: no entry {entry_id!r}")

    # -- running -----------------------------------------------------------------------------------------
    def restart(self) -> None:
        """At the app's start: entries the previous process left running go first again, then the queue
        goes on."""
        with self._lock:
            cut_off = [e for e in self._entries if e.state == RUNNING]
            for entry in cut_off:
                entry.state = QUEUED
                self._entries.remove(entry)
            first = next((i for i, e in enumerate(self._entries) if e.state == QUEUED), len(self._entries))
            self._entries[first:first] = cut_off
            if cut_off:
                self._save()
        held = [Path(e.run_dir) for e in cut_off if e.run_dir and Path(e.run_dir).is_dir()]
        if any(RunLock.is_held(folder) for folder in held):
            threading.Thread(target=self._dispatch_when_freed, args=(held,), name="scal-sdt-queue-restart",
                             daemon=True).start()
        else:
            self.dispatch()

    def _dispatch_when_freed(self, folders: list[Path]) -> None:
        """Dispatch once no folder is trained by another process any more, or after FREED_WAIT_S (the resume
        then fails naming the process that holds it)."""
        deadline = time.monotonic() + FREED_WAIT_S
        while time.monotonic() < deadline and any(RunLock.is_held(folder) for folder in folders):
            time.sleep(0.5)
        self.dispatch()

    def dispatch(self) -> None:
        """Start the first queued entry unless a job is active; an entry that cannot be built is failed with its
        reason and the next one is tried. The job is started unlocked: building it imports the engine."""
        while True:
            with self._lock:
                if any(e.state == RUNNING for e in self._entries) or self.manager.busy():
                    return
                entry = next((e for e in self._entries if e.state == QUEUED), None)
                if entry is None:
                    return
                # Marked before the start: a job that ends at once reports to _job_changed as this entry's.
                entry.state, entry.started_at, entry.error = RUNNING, time.time(), ""
                self._save()
            try:
                kind = self.kinds.get(entry.kind)
                if kind is None:  # queued by a version of the app that had this kind
                    raise QueueError(f"queue: this app has no job of kind {entry.kind!r}")
                self.manager.start(kind.job, kind.build(dataclasses.replace(entry)), entry.label, tag=entry.id)
                return
            except JobBusy:  # a job started from its tab meanwhile: this entry starts when that one ends
                with self._lock:
                    entry.state, entry.started_at = QUEUED, 0.0
                    self._save()
                return
            except Exception as error:
                with self._lock:
                    if entry.state == RUNNING:
                        self._end(entry, FAILED, one_line(error))

    def _end(self, entry: Entry, state: str, error: str) -> None:
        entry.state, entry.error, entry.ended_at = state, error, time.time()
        self._save()

    def _job_changed(self, history: Optional[History]) -> None:
        """The manager's listener: record the run folder and the end of an entry's job; once a job ended (any
        job: one started from its tab too), start the next entry."""
        if history is not None and history.tag:
            with self._lock:
                entry = next((e for e in self._entries if e.id == history.tag and e.state == RUNNING), None)
                if entry is not None:
                    if history.active:
                        entry.run_dir = history.run_dir
                        self._save()
                    else:
                        entry.run_dir = history.run_dir or entry.run_dir
                        error = history.error.strip().splitlines()[0] if history.error.strip() else ""
                        self._end(entry, FROM_HISTORY.get(history.state, FAILED), error)
        if history is None or not history.active:
            self.dispatch()
