"""A training run in a child process that prints one JSON event per line (`python -m engine train
--json-events`, alone or under torchrun), seen by the app as an in-process Trainer: start, stop, join,
result, and the same events on the same queue.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

from engine import events
from engine.job import Job

# How long a stopped run may take to finish its step and save its checkpoint before it is terminated.
STOP_GRACE_S = 300.0
STDERR_TAIL = 4000

if os.name == "nt":
    _OWN_GROUP = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
else:
    _OWN_GROUP = {"start_new_session": True}


def _interrupt(process: subprocess.Popen) -> None:
    """Ctrl+C as a terminal sends it, to the child's own process group: the app's process is not in it."""
    if os.name == "nt":
        # Windows can send a process group only a break, which ends the processes without the stop checkpoint.
        process.send_signal(signal.CTRL_BREAK_EVENT)
    else:
        os.killpg(process.pid, signal.SIGINT)


class ChildTraining(Job):
    """The engine's Job interface over a child process: the same start, stop, join, result and events."""
    thread_name = "scal-sdt-child"

    def __init__(self, command: Sequence[str], event_queue: queue.Queue, env: Optional[dict] = None,
                 files: Sequence[Path] = (), stop_grace_s: float = STOP_GRACE_S):
        super().__init__(event_queue)
        self.command = list(command)
        self.env = env
        self.files = list(files)  # temporary files the child reads, removed once it has ended
        self.stop_grace_s = stop_grace_s
        self.process: Optional[subprocess.Popen] = None
        self._stderr = None
        self._run_dir = ""
        self._step = 0
        self._checkpoints: set[str] = set()
        self._interrupted = threading.Lock()  # the child is interrupted once, by stop() or on its start
        self._killed = False  # kill() was called: a child started after it is killed as it starts

    def failure_context(self) -> str:
        return self._run_dir

    def stop(self, save_checkpoint: bool = True) -> None:
        """Interrupt the child, which stops after its current step and saves a checkpoint; a child still
        running after the grace period is terminated, and after another one killed."""
        super().stop(save_checkpoint)
        self._interrupt_child()

    def kill(self) -> None:
        """Kill the child and every process of its group (torchrun's workers) at once, with SIGKILL: for a
        child that a stop did not end. Its run then reports as stopped, with what it had saved."""
        self._killed = True
        self._stop.set()
        process = self.process
        if process is None:
            return  # not started yet: it is killed as it starts
        try:
            if os.name == "nt":
                process.kill()
            else:
                # The group even when its leader has exited: a worker left holding the output keeps the job going.
                os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the whole group has ended
            pass

    def _interrupt_child(self) -> None:
        process = self.process
        if process is None or process.poll() is not None or not self._interrupted.acquire(blocking=False):
            return  # not started yet (it is interrupted as it starts), already ended, or already interrupted
        try:
            _interrupt(process)
        except ProcessLookupError:  # it ended just now
            return
        threading.Thread(target=self._end_after_grace, name=f"{self.thread_name}-stop", daemon=True).start()

    # -- the child's output -----------------------------------------------------------------------------
    def _end_after_grace(self) -> None:
        for end in (self.process.terminate, self.process.kill):
            try:
                self.process.wait(self.stop_grace_s)
                return
            except subprocess.TimeoutExpired:
                end()

    def _run(self) -> events.Event:
        # A file rather than a pipe: nothing has to drain it while the child runs, and only its tail is read.
        self._stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                            encoding="utf-8", errors="replace", **_OWN_GROUP)
            # Its own process group keeps the app's Ctrl+C from reaching it, so closing the app stops it here.
            atexit.register(self.stop)
            if self._killed:
                self.kill()
            elif self.stop_requested:
                self._interrupt_child()
            return self._relay()
        finally:
            atexit.unregister(self.stop)
            self._stderr.close()
            self._remove_files()

    def _relay(self) -> events.Event:
        """Pass the child's events on; its final one is reported once it has exited, so that "finished"
        means gone."""
        outcome = None
        for line in self.process.stdout:
            event = self._parse(line.strip())
            if event is None:
                continue
            if isinstance(event, (events.Finished, events.Failed)):
                outcome = event
            else:
                self._note(event)
                self.emit(event)
        returncode = self.process.wait()
        if outcome is None:
            outcome = self._stopped() if self.stop_requested else self._failed(returncode)
        return outcome

    def _parse(self, line: str) -> Optional[events.Event]:
        """The event on a line; other output (a library printing to stdout) becomes a log line."""
        if not line:
            return None
        try:
            values = json.loads(line)
            if isinstance(values, dict):
                return events.event_from_dict(values)
        except ValueError:
            pass
        return events.Log(message=line)

    def _note(self, event: events.Event) -> None:
        if isinstance(event, events.Started):
            self._run_dir = event.run_dir
        elif isinstance(event, events.Step):
            self._step = event.step
        elif isinstance(event, events.CheckpointSaved):
            self._checkpoints.add(event.path)

    def _stopped(self) -> events.Event:
        """A stopped child exits without printing its last events; its run folder holds what it saved."""
        step = self._step
        if self._run_dir:
            from engine import checkpoints

            newest = checkpoints.latest_checkpoint(Path(self._run_dir))
            if newest is not None:
                step = checkpoints.read_meta(newest)["step"]
                if str(newest) not in self._checkpoints:
                    self.emit(events.CheckpointSaved(step=step, path=str(newest)))
        return events.Finished(run_dir=self._run_dir, step=step, stopped=True)

    def _failed(self, returncode: int) -> events.Event:
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - STDERR_TAIL))
        tail = self._stderr.read().decode("utf-8", "replace").strip()
        return events.Failed(error=f"the training processes exited with code {returncode} without a result"
                                   + (f":\n{tail}" if tail else ""), run_dir=self._run_dir)

    def _remove_files(self) -> None:
        for path in self.files:
            Path(path).unlink(missing_ok=True)
