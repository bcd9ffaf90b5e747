"""A conversion (`models.convert.convert_checkpoint`) as a background job, so that it can wait its turn
behind training runs: the converter's Progress and Log events, then Finished with the file written."""
from __future__ import annotations

import queue
from typing import Optional

from . import events
from .job import Job


class ConvertJob(Job):
    thread_name = "scal-sdt-convert"

    def __init__(self, source: str, out: str, options: dict, event_queue: Optional[queue.Queue] = None):
        """options: convert_checkpoint's keyword arguments (dtypes, formats, overwrite…)."""
        super().__init__(event_queue)
        self.source, self.out, self.options = source, out, dict(options)

    def _run(self) -> events.Event:
        # Not stoppable midway: a file is written whole or not at all, and writing one takes seconds.
        from .models import convert

        path = convert.convert_checkpoint(self.source, self.out, on_event=self.emit, **self.options)
        size = path.stat().st_size
        self.log(f"wrote {path} ({convert.format_size(size)})")
        return events.Finished(summary={"path": str(path), "bytes": size})
