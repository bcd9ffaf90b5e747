"""Loss masks: a grayscale image per training image, white where the loss counts and black where it does not.

A mask is `<stem>.mask.png` beside its image (in a WebDataset shard: the member `<key>.mask.png` of its
sample), or `<stem>.png` in the concept's instance_set.mask_path (RGB(A) masks are read as their
luminance; alpha is ignored). It goes through its image's geometry, the
same EXIF orientation, rotation, bucket resize and crop, and flip, and is averaged down to the latent size
in the loss (losses.mask_weights). Folder scans never take mask files for training images.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .. import notices, paths
from ..errors import UserError
from .index import DataWarning
from .shards import MEMBER_SEPARATOR, image_file, names_shards, shard_masks, shard_paths

MASK_SUFFIX = ".mask.png"
_ORIENTATION = 0x0112


def concept_masks(instance_set, index: int, records: Iterable) -> dict[str, str]:
    """Image path -> mask path for the images (records) of data.concepts[index].instance_set."""
    mask_folder = paths.resolve(instance_set.mask_path) if instance_set.mask_path else ""
    images = paths.resolve(instance_set.path)
    in_shards = names_shards(images)
    if in_shards and not mask_folder:
        return shard_masks(shard_paths(images, f"config key 'data.concepts[{index}].instance_set.path'"))
    return find_masks(records, images, mask_folder, f"config key 'data.concepts[{index}].instance_set.mask_path'",
                      members=in_shards)


def check_masks(masks: dict[str, str], records: Sequence) -> None:
    """Refuse masked training when no training image has a mask; warn once about those without one."""
    missing = sum(record.path not in masks for record in records)
    if missing == len(records):
        raise UserError(f"config key 'masked_loss.enabled': none of the {len(records)} training images has a mask "
                        f"(<name>{MASK_SUFFIX} beside it, or <name>.png in instance_set.mask_path); add masks or "
                        "set it to false")
    if missing:
        notices.warn(f"{missing} of {len(records)} images have no mask; they train unmasked", DataWarning)


def find_masks(records: Iterable, image_folder: str, mask_folder: str = "",
               label: str = "mask_path", members: bool = False) -> dict[str, str]:
    """Image path -> mask path, for each of the records (images of image_folder, or with `members` shard
    members, matched by member name in mask_folder) that has a mask. One listing of the folder, so that a
    large dataset costs no file check per image."""
    folder, suffix = (mask_folder, ".png") if mask_folder else (image_folder, MASK_SUFFIX)
    if not os.path.isdir(folder):
        raise UserError(f"{label}: folder not found: {folder}")
    with os.scandir(folder) as entries:
        by_stem = {entry.name[:-len(suffix)]: entry.path for entry in entries
                   if entry.name.lower().endswith(suffix) and not entry.name.startswith(".")}
    found = {}
    for record in records:
        name = record.path.rpartition(MEMBER_SEPARATOR)[2] if members else os.path.basename(record.path)
        mask = by_stem.get(name.rpartition(".")[0])
        if mask is not None:
            found[record.path] = mask
    return found


def _image_transpose(image_path: str) -> Optional["Image.Transpose"]:
    """The PIL transpose that the image's EXIF orientation stands for, or None."""
    from PIL import Image

    methods = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
    with Image.open(image_file(image_path)) as image:
        return methods.get(image.getexif().get(_ORIENTATION, 1))


def load_mask(path: str, image_path: str, size: tuple[int, int]):
    """The mask as an 8-bit grayscale image of its image's upright size `size` (width, height).

    A mask with an EXIF orientation is turned upright by it. One without, whose sides are the image's
    swapped, was drawn over the stored pixels of a photo that EXIF turns a quarter, and is turned as the
    photo is. A mask of another resolution but the image's aspect is resized to it; any other is refused.
    """
    from PIL import Image, ImageOps

    with Image.open(image_file(path)) as mask:
        own_orientation = mask.getexif().get(_ORIENTATION, 1) != 1
        mask = ImageOps.exif_transpose(mask)
        if mask.mode.startswith("I"):  # 16-bit PNGs: scale into 8 bits as images are
            array = np.asarray(mask, dtype=np.float32)
            scale = 65535.0 if array.max() > 255 else 255.0
            mask = Image.fromarray((array / scale * 255.0).round().clip(0, 255).astype(np.uint8))
        mask = mask.convert("L")
    swapped = (size[1], size[0])
    if mask.size == swapped and swapped != size and not own_orientation:
        method = _image_transpose(image_path)
        if method is not None:
            mask = mask.transpose(method)
    if mask.size != size:
        # a mask exported at another resolution; further apart in aspect than a pixel of rounding, a mistake
        if abs(mask.width * size[1] - mask.height * size[0]) > size[0] + size[1]:
            raise ValueError(f"the mask is {mask.width}x{mask.height}, its image {size[0]}x{size[1]}")
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor:
    """[1, height, width] uint8; no mask (an image without one, a class image) is all white: weight 1."""
    if mask is None:
        return torch.full((1, size[1], size[0]), 255, dtype=torch.uint8)
    return torch.from_numpy(np.array(mask, dtype=np.uint8))[None]
