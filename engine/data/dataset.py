"""Datasets: per-sample transforms and DreamBooth instance/class pairing (records and captions: dataset_index).

Buckets decide each image's target size; with bucketing off every image has the same size
(resolution x resolution). Randomness for crops and caption dropout is derived from (seed, epoch, index)
so that a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import torch

from .. import notices
from .index import DataWarning, ImageRecord
from .masks import load_mask, mask_tensor
from .records import LazyRecords
from .shards import image_file
from ..errors import UserError


def seeded_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def load_image(path: str):
    """Open an image (a file, or a shard member: see shards) upright (EXIF orientation applied) in RGB."""
    from PIL import Image, ImageOps

    with Image.open(image_file(path)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "LA", "RGBA", "PA"):  # transparent pixels become white, not black
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        if image.mode.startswith("I"):  # 16-bit and 32-bit integer images: scale into 8 bits
            array = np.asarray(image, dtype=np.float32)
            scale = 65535.0 if array.max() > 255 else 255.0
            image = Image.fromarray((array / scale * 255.0).clip(0, 255).astype(np.uint8))
        return image.convert("RGB")


def crop_box(image_size: tuple[int, int], width: int, height: int, center: bool,
             rng: Optional[np.random.Generator]) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): the image resized keeping its aspect to cover
    width x height, and where the crop of exactly that size starts in it."""
    from .buckets import cover_resize

    _, resized_w, resized_h = cover_resize(image_size, (width, height))
    extra_w, extra_h = resized_w - width, resized_h - height
    if center or rng is None:
        return resized_w, resized_h, extra_w // 2, extra_h // 2
    return resized_w, resized_h, int(rng.integers(0, extra_w + 1)), int(rng.integers(0, extra_h + 1))


def apply_crop(image, box: tuple[int, int, int, int], width: int, height: int):
    from PIL import Image

    resized_w, resized_h, left, top = box
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    return image.crop((left, top, left + width, top + height))


def crop_to_size(image, width: int, height: int, center: bool, rng: Optional[np.random.Generator]):
    """Resize keeping the aspect so the image covers width x height, then crop to exactly that size."""
    return apply_crop(image, crop_box(image.size, width, height, center, rng), width, height)


def mirrored_box(box: tuple[int, int, int, int], width: int) -> tuple[int, int, int, int]:
    """`box` (see crop_box) of a crop `width` wide for the crop mirrored left to right: that is the crop of
    the mirrored resized image whose left edge is where the crop's right edge was, counted from the
    resized image's right edge. The top does not change."""
    resized_w, resized_h, left, top = box
    return resized_w, resized_h, resized_w - (left + width), top


def time_ids(original: tuple[int, int], box: tuple[int, int, int, int], size: tuple[int, int]) -> list[int]:
    """SDXL's micro-conditioning of one example: original (height, width), crop (top, left) in the resized
    image, target (height, width)."""
    return [original[1], original[0], box[3], box[2], size[1], size[0]]


def to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples, each paired with a class example of the same size when prior preservation is on.

    Index i is the i-th instance sample (an image appears once per repeat of its concept, each copy with
    its own random draws); its target size is `sizes[bucket_of_instance[i]]`. Groups are
    the concepts: an instance image is paired only with class images of its own concept. When `latents`
    is set (a cache.LatentReader), examples carry the VAE's latent distribution instead of pixels. `masks`
    (image path -> mask file) turns masked training on: every example then carries a loss mask, all white
    for an image without a mask file and for class images. `controls` (image path -> its control images, see
    controls) gives every example its control images cropped to its size (and, with `latents`, their cached
    latents).
    """

    def __init__(self, instances: Sequence[ImageRecord], instance_buckets: Sequence[int],
                 sizes: Sequence[tuple[int, int]], tokenizer, center_crop: bool, seed: int,
                 classes: Sequence[ImageRecord] = (), class_buckets: Sequence[int] = (),
                 uncond_p: float = 0.0, captions=None, augment: Sequence = (),
                 prompt_expansions: Optional[dict] = None, instance_groups: Sequence[int] = (),
                 class_groups: Sequence[int] = (), masks: Optional[dict[str, str]] = None,
                 controls: Optional[dict[str, tuple[str, ...]]] = None):
        # Lazy records (see records) stay lazy: a record is built only for the example being made.
        self.instances = instances if isinstance(instances, LazyRecords) else list(instances)
        self.instance_buckets = list(instance_buckets)
        self.sizes = list(sizes)
        self.tokenizer = tokenizer
        self.center_crop = center_crop
        self.seed = seed
        self.classes = classes if isinstance(classes, LazyRecords) else list(classes)
        self.uncond_p = uncond_p
        self.captions = captions
        self.augment = list(augment)
        self.prompt_expansions = prompt_expansions or {}
        self.masks = masks
        self.controls = controls
        self.epoch = 0
        self.instance_groups = list(instance_groups) or [0] * len(self.instances)
        self.latents = None
        self.class_pool = self._class_pools(class_buckets, list(class_groups) or [0] * len(self.classes)) \
            if self.classes else {}
        self.instance_pool = index_pools(self.instance_groups, self.instance_buckets)

    def _class_pools(self, class_buckets: Sequence[int],
                     class_groups: Sequence[int]) -> dict[tuple[int, int], list[int]]:
        """For each (concept, instance bucket), the concept's class images of that bucket, else of its
        nearest-aspect bucket that has some."""
        by_key: dict[tuple[int, int], list[int]] = {}
        for index, key in enumerate(zip(class_groups, class_buckets)):
            by_key.setdefault(key, []).append(index)
        pools = {}
        for group, bucket in set(zip(self.instance_groups, self.instance_buckets)):
            if (group, bucket) in by_key:
                pools[group, bucket] = by_key[group, bucket]
                continue
            width, height = self.sizes[bucket]
            candidates = [b for g, b in by_key if g == group]
            nearest = min(candidates, key=lambda b: abs(np.log(self.sizes[b][0] / self.sizes[b][1])
                                                        - np.log(width / height)))
            pools[group, bucket] = by_key[group, nearest]
        return pools

    def crops(self) -> set[tuple[str, tuple[int, int]]]:
        """Every (image path, target size) this dataset can produce, class images included."""
        found = {(r.path, self.sizes[b]) for r, b in zip(self.instances, self.instance_buckets)}
        if self.controls:
            found.update((control, self.sizes[b]) for r, b in zip(self.instances, self.instance_buckets)
                         for control in self.controls[r.path])
        for (_, bucket), pool in self.class_pool.items():
            found.update((self.classes[i].path, self.sizes[bucket]) for i in pool)
        return found

    def prompts(self) -> set[str]:
        """Every caption an example can carry while captions are neither shuffled nor dropped per step."""
        texts = {record.caption for record in itertools.chain(self.instances, self.classes)} | {""}
        if not self.prompt_expansions:
            return texts
        from ..models.embeddings import expand_tokens

        return {expand_tokens(text, self.prompt_expansions) for text in texts}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instances)

    def _example(self, record: ImageRecord, size: tuple[int, int], rng: np.random.Generator) -> dict:
        from .augment import augment_after_crop, augment_before_crop, process_caption

        if self.latents is not None:
            # Cached only with a centre crop and no augmentation, which draw nothing from rng.
            values = {"latent_params": self.latents.get(record.path, size)}
            original = (record.width, record.height)
            box = crop_box(original, size[0], size[1], True, None)
            # The mask is cropped as the cached latent's pixels were.
            mask = self._mask(record, original)
            mask = apply_crop(mask, box, size[0], size[1]) if mask is not None else None
        else:
            try:
                image = load_image(record.path)
            except Exception as error:  # PIL raises many types for files it cannot decode
                raise UnusableImage(f"skipping {record.path}: cannot decode it: {error}") from None
            mask = self._mask(record, image.size)
            if self.augment:
                image, mask = augment_before_crop(image, self.augment, rng, mask)
            original = image.size
            box = crop_box(original, size[0], size[1], self.center_crop, rng)
            image = apply_crop(image, box, size[0], size[1])
            mask = apply_crop(mask, box, size[0], size[1]) if mask is not None else None
            if self.augment:
                image, mask, mirrored = augment_after_crop(image, self.augment, rng, mask)
                if mirrored:
                    # time_ids name the crop the pixels show, which for mirrored pixels is the mirrored
                    # crop (as kohya's sd-scripts conditions flipped samples).
                    box = mirrored_box(box, size[0])
            values = {"pixel_values": to_tensor(image)}
        if self.controls is not None:
            values.update(self._control(record, original, box, size))
        if self.masks is not None:
            values["mask"] = mask_tensor(mask, size)
        values["time_ids"] = time_ids(original, box, size)
        caption = process_caption(record.caption, self.captions, rng)
        if self.uncond_p > 0 and rng.random() < self.uncond_p:
            caption = ""
        if self.prompt_expansions:
            from ..models.embeddings import expand_tokens

            caption = expand_tokens(caption, self.prompt_expansions)
        return {**values, "input_ids": tokenize(self.tokenizer, caption), "caption": caption, "path": record.path}

    def _control(self, record: ImageRecord, original: tuple[int, int], box: tuple[int, int, int, int],
                 size: tuple[int, int]) -> dict:
        """The image's control images [n, 3, H, W], each cropped as the image was when both have the same size,
        else centred; with the latent cache, also their cached latents (cached centred, as the image's own)."""
        pixels = []
        for path in self.controls[record.path]:
            try:
                control = load_image(path)
            except Exception as error:  # PIL raises many types for files it cannot decode
                raise UnusableImage(f"skipping {record.path}: cannot decode its control image {path}: "
                                    f"{error}") from None
            crop = box if control.size == original else crop_box(control.size, size[0], size[1], True, None)
            pixels.append(to_tensor(apply_crop(control, crop, size[0], size[1])))
        values = {"control_pixel_values": torch.stack(pixels)}
        if self.latents is not None:
            values["control_latent_params"] = torch.stack([self.latents.get(path, size)
                                                           for path in self.controls[record.path]])
        return values

    def _mask(self, record: ImageRecord, upright: tuple[int, int]):
        """The image's mask at its upright size, or None (masked training off, or no mask file)."""
        path = self.masks.get(record.path) if self.masks else None
        if path is None:
            return None
        try:
            return load_mask(path, record.path, upright)
        except Exception as error:  # PIL raises many types for files it cannot decode
            raise UnusableImage(f"skipping {record.path}: cannot use its mask {path}: {error}") from None

    def _first_usable(self, records: Sequence[ImageRecord], pool: list[int], start: int, size: tuple[int, int],
                      rng: np.random.Generator) -> dict:
        """The example of pool[start], or of the next image of the pool that decodes: a file whose header
        read fine but whose pixels do not is replaced, with a warning naming it."""
        for step in range(len(pool)):
            try:
                return self._example(records[pool[(start + step) % len(pool)]], size, rng)
            except UnusableImage as error:
                notices.warn(str(error), DataWarning)
        raise UserError(f"none of the {len(pool)} images of the {size[0]}x{size[1]} bucket can be decoded")

    def __getitem__(self, index: int) -> dict:
        rng = seeded_rng(self.seed, self.epoch, index)
        bucket = self.instance_buckets[index]
        size = self.sizes[bucket]
        # Replacements for an image that cannot be decoded come after it, from its own concept and bucket.
        same_bucket = self.instance_pool[self.instance_groups[index], bucket]
        start = int(np.searchsorted(same_bucket, index))
        item = {"instance": self._first_usable(self.instances, same_bucket, start, size, rng)}
        # keys for the training noise of each row (see step.RowNoise), drawn from the same per-sample stream
        item["instance"]["sample_key"] = int(rng.integers(2**62))
        if self.classes:
            pool = self.class_pool[self.instance_groups[index], bucket]
            # Rotating through the pool by epoch pairs each instance image with different class images
            # over the run, and never runs out when there are fewer class images than steps.
            start = (index + self.epoch * len(self.instances)) % len(pool)
            item["class"] = self._first_usable(self.classes, pool, start, size, rng)
            item["class"]["sample_key"] = int(rng.integers(2**62))
        return item


def index_pools(groups: Sequence[int], buckets: Sequence[int]) -> dict[tuple[int, int], np.ndarray]:
    """The dataset indices of each (concept, bucket), ascending: arrays, so that a million samples are not a
    million Python ints."""
    groups, buckets = np.asarray(groups, dtype=np.int64), np.asarray(buckets, dtype=np.int64)
    keys = groups * (int(buckets.max()) + 1 if len(buckets) else 1) + buckets
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(keys[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {(int(groups[order[start]]), int(buckets[order[start]])): order[start:end]
            for start, end in zip(starts.tolist(), ends.tolist())}


class UnusableImage(Exception):
    pass


class Collate:
    """Stack a batch: instance examples first, then their class examples. A class, so it pickles on Windows."""

    def __init__(self, pad_token_id: int, max_length: int, pad_to_max: bool):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_max = pad_to_max

    def __call__(self, items: list[dict]) -> dict:
        examples = [item["instance"] for item in items]
        num_instance = len(examples)
        examples += [item["class"] for item in items if "class" in item]
        length = self.max_length if self.pad_to_max else max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example["input_ids"][:length]
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        images = "latent_params" if "latent_params" in examples[0] else "pixel_values"
        batch = {
            images: torch.stack([e[images] for e in examples]),
            "input_ids": input_ids,
            "captions": [e["caption"] for e in examples],
            "paths": [e["path"] for e in examples],  # the files actually used, replacements included
            "sample_keys": torch.tensor([e["sample_key"] for e in examples], dtype=torch.long),
            "time_ids": torch.tensor([e["time_ids"] for e in examples], dtype=torch.float32),
            "num_instance": num_instance,
        }
        if "mask" in examples[0]:
            batch["masks"] = torch.stack([e["mask"] for e in examples])
        for key in ("control_pixel_values", "control_latent_params"):
            if key in examples[0]:
                batch[key] = torch.stack([e[key] for e in examples])
        return batch
