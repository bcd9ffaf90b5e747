"""Worker processes for CPU-bound work on many files, one per core: `python -m engine.data.worker_pool`.

Each worker is a fresh interpreter that imports only what its calls need. A multiprocessing pool would
not do: its spawned workers re-run the parent's main script, which for the app imports the whole GUI,
and forked ones inherit whatever locks the app's other threads hold.

The protocol is pickles over the worker's stdin and stdout: the parent sends (function, arguments),
the worker answers (True, result) or (False, the error's traceback). Functions travel by reference, so
they are module-level functions of this package.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Sequence

# The folder that holds the engine package, for workers started from any working directory.
_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class WorkerPool:
    """`processes` workers, each serving calls until its input ends (close)."""

    def __init__(self, processes: int):
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [_ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
            # The workers do no linear algebra: NumPy's BLAS threads would only spin up and take cores.
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self._workers = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=environment)
                         for _ in range(processes)]

    @property
    def processes(self) -> int:
        return len(self._workers)

    def map(self, function: Callable, calls: Sequence[tuple]) -> list:
        """function(*arguments) for each arguments of `calls`, in order; each worker takes the next call
        as soon as it is free, so a slow chunk does not hold the others back."""
        results = [None] * len(calls)
        failures = []
        next_call = iter(range(len(calls)))
        lock = threading.Lock()

        def serve(worker: subprocess.Popen) -> None:
            while not failures:
                with lock:
                    index = next(next_call, None)
                if index is None:
                    return
                try:
                    pickle.dump((function, calls[index]), worker.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                    worker.stdin.flush()
                    succeeded, value = pickle.load(worker.stdout)
                except (OSError, ValueError, EOFError, pickle.UnpicklingError):  # its pipes broke or closed
                    succeeded, value = False, f"the worker process ended (exit code {worker.poll()})"
                if not succeeded:
                    failures.append(value)
                    return
                results[index] = value

        threads = [threading.Thread(target=serve, args=(worker,), daemon=True) for worker in self._workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError(f"a worker process failed: {failures[0]}")
        return results

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.stdin.close()  # the worker ends at the end of its input
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            worker.stdout.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _serve() -> None:
    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    # Anything the work prints, from Python or C, goes to stderr, never into the answers.
    os.dup2(2, 1)
    while True:
        try:
            function, arguments = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = (True, function(*arguments))
        except Exception:
            answer = (False, traceback.format_exc())
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    _serve()
