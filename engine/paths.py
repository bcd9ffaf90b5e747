"""Where offline demo assets live, and how `demo:` paths in configs resolve to them."""
from __future__ import annotations

import os
import threading
from pathlib import Path

DEMO_PREFIX = "demo:"
_build_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("SCAL_SDT_CACHE", Path.home() / ".cache" / "scal-sdt"))


def demo_model_dir() -> Path:
    """The tiny demo pipeline, built on first use."""
    from .tiny import make_tiny_model

    target = cache_dir() / "tiny-sd"
    with _build_lock:
        if not (target / "model_index.json").is_file():
            make_tiny_model(target)
    return target


def demo_data_dir() -> Path:
    """The synthetic sample dataset, written on first use."""
    from .tiny import make_sample_data

    target = cache_dir() / "sample-data"
    with _build_lock:
        if not (target / "finetune").is_dir():
            make_sample_data(target)
    return target


def resolve(path: str) -> str:
    """Map `demo:tiny-sd` and `demo:sample-data/...` to the cache folder; other paths are returned as given."""
    if not path.startswith(DEMO_PREFIX):
        return os.path.expanduser(path)
    name = path[len(DEMO_PREFIX):].strip("/")
    if name == "tiny-sd":
        return str(demo_model_dir())
    if name == "sample-data" or name.startswith("sample-data/"):
        return str(demo_data_dir() / name[len("sample-data"):].strip("/"))
    return str(cache_dir() / name)
