"""Control images: the pictures an edit model starts from, given for each training image (its target).

A target's controls are `<stem>.control.<ext>`, then `<stem>.control2.<ext>` and `<stem>.control3.<ext>` for
more, beside it (any image extension), or one same-named image `<stem>.<ext>` in the concept's
instance_set.control_path. Every training image has as many (a batch stacks them). Each is cropped to its
target's bucket: with the target's own crop box when both have the same size (photos of one scene before and
after an edit stay aligned), else centred; the latent cache stores its latents beside the target's. Folder scans
never take control files for training images. Controls are looked for only for a family whose tokenizer says
`reads_controls`, and a target without one is refused.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from .. import paths
from ..errors import UserError
from .listing import CONTROL_MARKS, IMAGE_EXTENSIONS
from .shards import names_shards


def _by_stem(folder: str, marks: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """Stem -> {index of its mark: path} for the folder's visible files named <stem><mark><image extension>."""
    found: dict[str, dict[int, str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            lower = entry.name.lower()
            if entry.name.startswith("."):
                continue
            for index, mark in enumerate(marks):
                suffix = next((mark + e for e in IMAGE_EXTENSIONS if lower.endswith(mark + e)), None)
                if suffix is not None:
                    found.setdefault(entry.name[:-len(suffix)], {}).setdefault(index, entry.path)
                    break
    return found


def _beside() -> Callable[[str], dict[str, dict[int, str]]]:
    """A target's path -> its folder's controls by stem (each folder listed once)."""
    listings: dict[str, dict[str, dict[int, str]]] = {}

    def listing(path: str) -> dict[str, dict[int, str]]:
        folder = os.path.dirname(path)
        if folder not in listings:
            listings[folder] = _by_stem(folder, CONTROL_MARKS)
        return listings[folder]
    return listing


def _stem(path: str) -> str:
    return os.path.basename(path).rpartition(".")[0]


def concept_controls(instance_set, index: int, records: Iterable) -> dict[str, tuple[str, ...]]:
    """Image path -> its control images for every record (image) of data.concepts[index].instance_set; a record
    without one is refused, naming it and the key to set."""
    key = f"config key 'data.concepts[{index}].instance_set.control_path'"
    if names_shards(paths.resolve(instance_set.path)):
        raise UserError(f"{key}: control images are read from folders; {instance_set.path} names shards")
    if not instance_set.control_path:
        return controls_beside(records, key)
    folder = paths.resolve(instance_set.control_path)
    if not os.path.isdir(folder):
        raise UserError(f"{key}: folder not found: {folder}")
    by_stem = _by_stem(folder, ("",))
    return _matched(records, lambda _: by_stem, f"<name>.png in {folder}", key)


def controls_beside(records: Iterable, key: str) -> dict[str, tuple[str, ...]]:
    """Image path -> its control images beside it (<stem>.control.<ext>, <stem>.control2.<ext>, …), for every
    record; one without is refused naming key."""
    return _matched(records, _beside(), f"<name>{CONTROL_MARKS[0]}.png beside it", key)


def found_controls(instance_set, records: Iterable) -> dict[str, tuple[str, ...]]:
    """Image path -> its control images, in order, for the records that have any (the Dataset tab shows the
    pairs whatever the model); nothing is refused."""
    if instance_set.control_path:
        folder = paths.resolve(instance_set.control_path)
        by_stem = _by_stem(folder, ("",)) if os.path.isdir(folder) else {}
    elif names_shards(paths.resolve(instance_set.path)):
        return {}
    beside = None if instance_set.control_path else _beside()
    found = {}
    for record in records:
        controls = (by_stem if beside is None else beside(record.path)).get(_stem(record.path), {})
        if controls:
            found[record.path] = tuple(controls[index] for index in sorted(controls))
    return found


def _matched(records: Iterable, listing: Callable[[str], dict], where: str, key: str) -> dict[str, tuple[str, ...]]:
    found = {}
    for record in records:
        controls = listing(record.path).get(_stem(record.path), {})
        if not controls:
            raise UserError(f"{key}: {record.path} has no control image ({where}); add one or remove the image")
        if sorted(controls) != list(range(len(controls))):
            raise UserError(f"{key}: the control images of {record.path} skip a number; name them "
                            f"{', '.join('<name>' + mark + '.png' for mark in CONTROL_MARKS)} in turn")
        found[record.path] = tuple(controls[index] for index in range(len(controls)))
    check_counts(found, key)
    return found


def check_counts(controls: dict[str, tuple[str, ...]], key: str) -> None:
    """Refuse training images with different numbers of control images: a batch stacks them."""
    counts = {}
    for path, found in controls.items():
        counts.setdefault(len(found), path)
    if len(counts) > 1:
        (many, first), (other, second) = sorted(counts.items())[-1], sorted(counts.items())[0]
        raise UserError(f"{key}: {first} has {many} control images but {second} has {other}; every training "
                        "image needs as many")
