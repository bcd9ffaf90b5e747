"""Where files go: the offline demo assets (what `demo:` paths in configs resolve to), and the folders
a config names for output."""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

DEMO_PREFIX = "demo:"
_build_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("SCAL_SDT_CACHE", Path.home() / ".cache" / "scal-sdt"))


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Build target unless it exists; the folder only ever appears complete.

    Several processes (torchrun ranks, the app beside a CLI run) may build at once, and a build may be killed
    halfway. Each one builds into its own hidden sibling folder and renames it into place, so the final
    folder existing is the proof of a finished build; whoever renames second throws its copy away.
    """
    if target.is_dir():
        return target
    # The lock only saves threads of one process from building the same thing twice.
    with _build_lock:
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not mkdtemp: its owner-only mode would stick to the renamed folder.
        staging = target.with_name(f".{target.name}.building-{uuid.uuid4().hex}")
        staging.mkdir()
        try:
            build(staging)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def demo_model_dir(arch: str = "sd") -> Path:
    """The tiny demo pipeline of an architecture (a key of models.tiny.ARCHITECTURES), built on first use."""
    from .models.tiny import make_tiny_model

    return build_once(cache_dir() / f"tiny-{arch}", lambda folder: make_tiny_model(folder, arch=arch))


def demo_data_dir() -> Path:
    """The synthetic sample dataset, written on first use; its edit/ pairs are added to one written before it
    had them."""
    from .models.tiny import make_edit_pairs, make_sample_data

    folder = build_once(cache_dir() / "sample-data", make_sample_data)
    build_once(folder / "edit", make_edit_pairs)
    return folder


def resolve(path: str) -> str:
    """Map `demo:tiny-<arch>` (tiny-sd, tiny-sd21, tiny-sdxl, tiny-flux, tiny-flux-schnell, tiny-chroma,
    tiny-z-image, tiny-qwen-image, tiny-qwen-image-edit, tiny-flux2-klein) and `demo:sample-data/...` to the cache
    folder; other paths are returned as given."""
    if not path.startswith(DEMO_PREFIX):
        return os.path.expanduser(path)
    name = path[len(DEMO_PREFIX):].strip("/")
    if name in ("tiny-sd", "tiny-sd21", "tiny-sdxl", "tiny-flux", "tiny-flux-schnell", "tiny-chroma",
                "tiny-z-image", "tiny-qwen-image", "tiny-qwen-image-edit", "tiny-flux2-klein"):
        return str(demo_model_dir(name[len("tiny-"):]))
    if name == "sample-data" or name.startswith("sample-data/"):
        return str(demo_data_dir() / name[len("sample-data"):].strip("/"))
    return str(cache_dir() / name)


def existing_file(given, key: str) -> Path:
    """The file config key `key` names, resolved; refused naming the key when it is not a file."""
    path = Path(resolve(str(given)))
    if not path.is_file():
        raise UserError(f"config key '{key}': not a file: {path}")
    return path


def writable_folder(folder: Path, key: str) -> Path:
    """Create folder if needed and make sure it can be written; errors name the config key."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"config key '{key}': cannot create {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"config key '{key}': {folder} is not writable")
    return folder


def missing_path(config) -> Optional[str]:
    """The one-line error a start would give for the first file or folder the config names that does not
    exist, or None. `demo:` paths are built on first use, shard patterns are expanded by the data source, and
    a model named by a Hugging Face Hub id or a URL is downloaded at the start, so none is looked at here."""
    from . import hub

    named = [("model", config.model), ("vae", config.vae), ("tokenizer", config.tokenizer),
             ("validation.path", config.validation.path)]
    for index, concept in enumerate(config.data.concepts):
        named.append((f"data.concepts[{index}].instance_set.path", concept.instance_set.path))
        if config.prior_preservation.enabled and not concept.class_set.auto_generate.enabled:
            named.append((f"data.concepts[{index}].class_set.path", concept.class_set.path))
    for key, value in named:
        if not value or value.startswith(DEMO_PREFIX) or "{" in value or Path(os.path.expanduser(value)).exists():
            continue
        if key == "model" and (hub.is_url(value) or hub.parse_hub_id(value)):
            continue
        return f"config key '{key}': not found: {value}"
    return None

