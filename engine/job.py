"""A background job (training, class generation) that reports through typed events and can be stopped."""
from __future__ import annotations

import gc
import queue
import threading
import traceback
from typing import Callable, Optional

from . import events
from .errors import UserError

OOM_ADVICE = ("out of GPU memory. Try, in this order: a smaller preset (dreambooth-10gb or dreambooth-6gb), "
              "batch_size 1, gradient_checkpointing: true, optimizer.name: bitsandbytes.optim.AdamW8bit, "
              "and cached latents")


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Job:
    thread_name = "scal-sdt-job"

    def __init__(self, event_queue: Optional[queue.Queue] = None, on_event: Optional[Callable] = None,
                 stop_event: Optional[threading.Event] = None):
        self.events = event_queue
        self.on_event = on_event
        self.thread: Optional[threading.Thread] = None
        self.result: Optional[events.Event] = None
        self._stop = stop_event or threading.Event()  # a job run inside another shares its stop request
        self._save_on_stop = True

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self.thread.start()
        return self.thread

    def stop(self, save_checkpoint: bool = True) -> None:
        """Ask the job to end after its current step (or batch)."""
        self._save_on_stop = save_checkpoint
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def join(self, timeout: Optional[float] = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def emit(self, event: events.Event) -> None:
        if self.events is not None:
            self.events.put(event)
        if self.on_event is not None:
            self.on_event(event)

    def log(self, message: str, level: str = "info") -> None:
        self.emit(events.Log(level=level, message=message))

    def failure_context(self) -> str:
        """The run folder or output a failure refers to, if any."""
        return ""

    def describe_failure(self, message: str) -> str:
        """The one-line error of a failure, with what the job leaves behind (a training run's checkpoint)."""
        return message

    def run(self) -> events.Event:
        """Run to the end or until stopped; never raises. Returns the Finished or Failed event."""
        import torch  # here, not at import: the app's page uses jobs without loading torch

        from . import allocator, hub

        allocator.keep_freed_memory()
        try:
            with hub.report_to(self.emit):  # a base model downloaded at the start shows its progress
                result = self._run()
        except UserError as error:
            result = events.Failed(error=self.describe_failure(str(error)), run_dir=self.failure_context(),
                                   user_error=True)
        except torch.OutOfMemoryError:
            release_memory()
            result = events.Failed(error=self.describe_failure(OOM_ADVICE), run_dir=self.failure_context(),
                                   user_error=True)
        except Exception as error:  # an engine fault: reported with its traceback, the caller keeps running
            summary = self.describe_failure(f"{error.__class__.__name__}: {error}")
            result = events.Failed(error=f"{summary}\n{traceback.format_exc()}", run_dir=self.failure_context())
        self.result = result
        allocator.release_freed_memory()
        self.emit(result)
        return result

    def run_inline(self) -> events.Event:
        """Run as part of another job: errors propagate to it and no final event is emitted."""
        return self._run()

    def _run(self) -> events.Event:
        raise NotImplementedError
