"""Per-step figures of any PyTorch trainer, recorded from outside its code.

`bench/peers.py` runs each trainer with a `sitecustomize.py` on PYTHONPATH that calls `install()` at interpreter
start. A global optimizer-step hook then appends one JSON line per `optimizer.step()` to the file STEP_PROBE_OUT:
wall time, the process's CPU time (all its threads), its RSS and peak RSS, the torch thread count, and at the
first step the number of parameters the optimizer updates. After STEP_PROBE_STOP_AFTER steps the process ends
(exit 0), so no trainer spends the benchmark's time saving its final weights. Every trainer is measured at the
same point of its loop, without changes to its code.
"""
from __future__ import annotations

import json
import os
import resource
import time

OUT, STOP_AFTER, THREADS = "STEP_PROBE_OUT", "STEP_PROBE_STOP_AFTER", "STEP_PROBE_THREADS"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE


def _trained_parameters(optimizer) -> int:
    seen = {id(p): p.numel() for group in optimizer.param_groups for p in group["params"]}
    return sum(seen.values())


def _torchvision_without_ops() -> bool:
    """Let `import torchvision` work where its compiled ops cannot load (PyPI's CUDA build of torchvision beside a
    CPU build of torch): its import registers fake kernels for `nms` and `qnms` whether or not the ops loaded, and
    fails when they are not defined. Their schemas are defined here; the trainers only use torchvision's
    transforms, which are Python. Returns whether it was needed."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    library = os.path.join(spec.submodule_search_locations[0], "_C.so")
    try:
        torch.ops.load_library(library)
        return False
    except (OSError, ImportError):
        pass
    global _TORCHVISION_SCHEMAS  # kept alive: the definitions last as long as the Library object
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def install() -> None:
    """Record every optimizer step of this process (when STEP_PROBE_OUT is set)."""
    path = os.environ.get(OUT)
    if not path:
        return
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    threads = int(os.environ.get(THREADS, "0"))
    if threads:
        torch.set_num_threads(threads)
    stop_after = int(os.environ.get(STOP_AFTER, "0"))
    stubbed = _torchvision_without_ops()
    sink = open(path, "a", encoding="utf-8")
    count = 0

    def after_step(optimizer, args, kwargs) -> None:
        nonlocal count
        count += 1
        row = {"step": count, "time": time.perf_counter(), "cpu": time.process_time(), "rss": _rss_bytes(),
               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "threads": torch.get_num_threads()}
        if count == 1:
            row.update(trained=_trained_parameters(optimizer), torchvision_ops_stubbed=stubbed,
                       optimizer=type(optimizer).__module__ + "." + type(optimizer).__qualname__)
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        if count == stop_after:
            sink.close()
            os._exit(0)

    register_optimizer_step_post_hook(after_step)
