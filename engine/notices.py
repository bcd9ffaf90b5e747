"""Warnings for the user (a skipped image, an ignored config key) routed to whoever runs the work.

`warnings.catch_warnings` swaps process-wide state, so a training thread and the app's request threads
would catch each other's warnings. A thread that wants its notices (the training job, an app request)
installs a sink with `collect`; in a thread without a sink a notice is an ordinary Python warning.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

_local = threading.local()


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    sink = getattr(_local, "sink", None)
    if sink is not None:
        sink(message)
    else:
        warnings.warn(message, category, stacklevel=3)


def collecting() -> bool:
    """Whether this thread's notices go to a sink (see collect) rather than to Python's warnings."""
    return getattr(_local, "sink", None) is not None


@contextmanager
def collect(sink: Callable[[str], None]) -> Iterator[None]:
    """Deliver this thread's notices to sink for the duration of the block."""
    previous = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = previous
