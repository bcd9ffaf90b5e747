"""engine.allocator: a step's freed buffers reused instead of faulted in afresh, and given back to the OS when
a job ends. Each measurement runs in its own process: the setting is the process's."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

MEASURE = """
import json, resource, sys, threading
import torch
from engine import allocator
torch.set_num_threads(1)
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False

def step():  # the sizes of a model's activations, allocated and freed as a step does
    return sum(float(torch.ones(rows, 1024).sum()) for rows in (256, 2048, 8192, 16384, 32768))

def faults_per_step():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

faults = faults_per_step()
in_thread = []  # a training run's loop runs in a thread of its own
worker = threading.Thread(target=lambda: in_thread.append(faults_per_step()))
worker.start()
worker.join()

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

held = [torch.ones(2048, 1024) for _ in range(64)]  # 512 MiB in 8 MiB buffers
del held
freed = resident()
allocator.release_freed_memory()
print(json.dumps({"kept": kept, "faults": faults, "thread_faults": in_thread[0], "freed": freed,
                  "released": resident()}))
"""


def measure(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, mode], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_reused_without_page_faults_and_given_back_when_the_job_ends():
    default, kept = measure("default"), measure("keep")
    assert kept["kept"] is True
    # each step of the default allocator faults its ~233 MiB of buffers in again: ~60,000 pages; kept, a few
    # hundred on a quiet machine, a few thousand while other processes press on memory
    assert default["faults"] > 40_000 and kept["faults"] < default["faults"] / 5, (default, kept)
    # the same in a thread started after the setting, whose own arena would map its 128 MiB buffer afresh
    assert default["thread_faults"] > 40_000 and kept["thread_faults"] < default["thread_faults"] / 5, (default,
                                                                                                        kept)
    # kept memory is released at the end: most of the freed 512 MiB leaves the process
    assert kept["freed"] - kept["released"] > 400 * 2**20, kept


def test_a_job_keeps_freed_memory_while_it_runs_and_releases_it_after(monkeypatch):
    from engine import allocator, events
    from engine.job import Job

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(allocator, "release_freed_memory", lambda: calls.append("release"))

    class Probe(Job):
        def _run(self):
            calls.append("run")
            return events.Finished()

    assert isinstance(Probe().run(), events.Finished)
    assert calls == ["keep", "run", "release"]
