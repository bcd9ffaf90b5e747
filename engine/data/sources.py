"""Where a concept's images come from: a folder of image files (index) or WebDataset shards (shards).

Both give the same records, so that what follows a scan never needs to know which it was.
"""
from __future__ import annotations

from .index import ScanResult, scan_folder
from .shards import scan_shards, shard_paths


def scan_images(path: str, prompt_template: str, label: str) -> ScanResult:
    """The usable images at a dataset path, with their resolved prompts; `label` (the config key) starts
    each error about the path."""
    shards = shard_paths(path, label)
    if shards is None:
        return scan_folder(path, prompt_template, label)
    return scan_shards(shards, prompt_template)
