"""Datasets: image records, captions, per-sample transforms and DreamBooth instance/class pairing.

Buckets decide each image's target size; with bucketing off every image has the same size
(resolution x resolution). Randomness for crops and caption dropout is derived from (seed, epoch, index)
so that a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TXT_PROMPT = "{TXT_PROMPT}"
log = logging.getLogger(__name__)


class DataWarning(UserWarning):
    pass


@dataclass
class ImageRecord:
    path: str
    width: int
    height: int
    caption: str = ""  # the resolved prompt for this image


def read_caption(image_path: Path) -> Optional[str]:
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return None
    raw = caption_path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        warnings.warn(f"{caption_path}: caption is not UTF-8; read as latin-1", DataWarning, stacklevel=2)
        return raw.decode("latin-1").strip()


def resolve_prompt(template: str, image_path: Path) -> str:
    if TXT_PROMPT not in template:
        return template
    caption = read_caption(image_path)
    if caption is None:
        warnings.warn(f"{image_path}: no caption file {image_path.with_suffix('.txt').name} for {TXT_PROMPT}; "
                      "using the prompt without it", DataWarning, stacklevel=2)
        caption = ""
    return template.replace(TXT_PROMPT, caption).strip(" ,")


def seeded_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, stream])


def load_image(path: str):
    """Open an image upright (EXIF orientation applied) in RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "LA", "RGBA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        if image.mode == "I;16" or image.mode.startswith("I;16") or image.mode == "I":
            array = np.asarray(image, dtype=np.float32)
            scale = 65535.0 if array.max() > 255 else 255.0
            image = Image.fromarray((array / scale * 255.0).clip(0, 255).astype(np.uint8))
        return image.convert("RGB")


def crop_to_size(image, width: int, height: int, center: bool, rng: Optional[np.random.Generator]):
    """Resize keeping the aspect so the image covers width x height, then crop to exactly that size."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    resized_w = max(width, round(image.width * scale))
    resized_h = max(height, round(image.height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    extra_w, extra_h = resized_w - width, resized_h - height
    if center or rng is None:
        left, top = extra_w // 2, extra_h // 2
    else:
        left = int(rng.integers(0, extra_w + 1))
        top = int(rng.integers(0, extra_h + 1))
    return image.crop((left, top, left + width, top + height))


def to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples, each paired with a class example of the same size when prior preservation is on.

    Index i is the i-th instance image; its target size is `sizes[bucket_of_instance[i]]`.
    """

    def __init__(self, instances: Sequence[ImageRecord], instance_buckets: Sequence[int],
                 sizes: Sequence[tuple[int, int]], tokenizer, center_crop: bool, seed: int,
                 classes: Sequence[ImageRecord] = (), class_buckets: Sequence[int] = (),
                 uncond_p: float = 0.0):
        self.instances = list(instances)
        self.instance_buckets = list(instance_buckets)
        self.sizes = list(sizes)
        self.tokenizer = tokenizer
        self.center_crop = center_crop
        self.seed = seed
        self.classes = list(classes)
        self.uncond_p = uncond_p
        self.epoch = 0
        self.class_pool = self._class_pools(class_buckets) if self.classes else {}

    def _class_pools(self, class_buckets: Sequence[int]) -> dict[int, list[int]]:
        """For each instance bucket, the class images of that bucket, else of the nearest-aspect bucket."""
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(class_buckets):
            by_bucket.setdefault(bucket, []).append(index)
        pools = {}
        for bucket in set(self.instance_buckets):
            if bucket in by_bucket:
                pools[bucket] = by_bucket[bucket]
                continue
            width, height = self.sizes[bucket]
            nearest = min(by_bucket, key=lambda b: abs(np.log(self.sizes[b][0] / self.sizes[b][1])
                                                       - np.log(width / height)))
            pools[bucket] = by_bucket[nearest]
        return pools

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instances)

    def _example(self, record: ImageRecord, size: tuple[int, int], rng: np.random.Generator) -> dict:
        image = crop_to_size(load_image(record.path), size[0], size[1], self.center_crop, rng)
        caption = record.caption
        if self.uncond_p > 0 and rng.random() < self.uncond_p:
            caption = ""
        return {"pixel_values": to_tensor(image), "input_ids": tokenize(self.tokenizer, caption),
                "caption": caption}

    def __getitem__(self, index: int) -> dict:
        rng = seeded_rng(self.seed, self.epoch, index)
        bucket = self.instance_buckets[index]
        item = {"instance": self._example(self.instances[index], self.sizes[bucket], rng)}
        if self.classes:
            pool = self.class_pool[bucket]
            # Rotating through the pool by epoch pairs each instance image with different class images
            # over the run, and never runs out when there are fewer class images than steps.
            class_index = pool[(index + self.epoch * len(self.instances)) % len(pool)]
            item["class"] = self._example(self.classes[class_index], self.sizes[bucket], rng)
        return item


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
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": input_ids,
            "captions": [e["caption"] for e in examples],
            "num_instance": num_instance,
        }
