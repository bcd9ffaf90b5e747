"""Class (regularization) image generation for DreamBooth prior preservation.

For every concept whose class_set.auto_generate is enabled, the folder is filled up to num_target images.
With aspect-ratio bucketing the target is split over bucket sizes in proportion to the concept's instance
images. Only the shortfall is generated, so re-running a complete folder does nothing. Each image's seed
comes from the config seed, its size and its index within that size, and the index is recorded in a
sidecar file: a deleted image is regenerated identically.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import events, paths
from .data.buckets import plan_buckets
from .config import Config, add_overrides_argument, load
from .data.index import scan_folder
from .data.shards import names_shards
from .data.sources import scan_images
from .errors import UserError
from .job import Job, release_memory
from .models.family import family_for
from .models.sd import resolve_model_path
from .sampling import PromptEncoder, render

SIDECAR_SUFFIX = ".json"


@dataclass
class ImageTask:
    concept: int
    folder: Path
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    index: int  # position of the image among those of its size
    seed: int


def split_target(total: int, counts: list[int]) -> list[int]:
    """Split total over buckets in proportion to counts, rounding by largest remainder so the sum is kept."""
    weight = sum(counts)
    if weight == 0:
        return [0] * len(counts)
    exact = [total * c / weight for c in counts]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: (exact[i] - shares[i], counts[i]), reverse=True)
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


def image_seed(base_seed: int, width: int, height: int, index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{width}x{height}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _existing_indices(folder: Path) -> dict[tuple[int, int], set[int]]:
    """Indices of generated images still present, by size, read from their sidecars."""
    found: dict[tuple[int, int], set[int]] = {}
    for sidecar in folder.glob(f"*{SIDECAR_SUFFIX}"):
        image = sidecar.with_suffix(".png")
        if not image.is_file():
            continue
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            found.setdefault((meta["width"], meta["height"]), set()).add(int(meta["index"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def plan_class_images(config: Config) -> list[ImageTask]:
    """The images still missing in every auto-generated class folder."""
    tasks: list[ImageTask] = []
    base_seed = config.seed if config.seed is not None else 0
    for number, concept in enumerate(config.data.concepts):
        class_set = concept.class_set
        if class_set is None or not class_set.auto_generate.enabled:
            continue
        key = f"data.concepts[{number}].class_set"
        if not class_set.path:
            raise UserError(f"config key '{key}.path': a folder for the class images is required")
        if not class_set.prompt.strip():
            raise UserError(f"config key '{key}.prompt': the class prompt is empty")
        if names_shards(paths.resolve(class_set.path)):
            raise UserError(f"config key '{key}.auto_generate.enabled': class images are generated into a folder "
                            f"of images, but {key}.path names shards; turn it off or name a folder")
        folder = paths.writable_folder(Path(paths.resolve(class_set.path)), f"{key}.path")

        instances = scan_images(paths.resolve(concept.instance_set.path), concept.instance_set.prompt,
                                f"config key 'data.concepts[{number}].instance_set.path'")
        instance_plan = plan_buckets(config, instances.records)
        counts = [instance_plan.assignments.count(b) for b in range(len(instance_plan.sizes))]
        if not config.aspect_ratio_bucket.enabled or not instances.records:
            counts = [1] * len(instance_plan.sizes)
        targets = split_target(class_set.auto_generate.num_target, counts)

        existing = scan_folder(str(folder), class_set.prompt, f"config key '{key}.path'")
        existing_plan = plan_buckets(config, existing.records, sizes=instance_plan.sizes)
        have = [existing_plan.assignments.count(b) for b in range(len(instance_plan.sizes))]
        recorded = _existing_indices(folder)
        generation = class_set.auto_generate
        for bucket, (width, height) in enumerate(instance_plan.sizes):
            shortfall = targets[bucket] - have[bucket]
            if shortfall <= 0:
                continue
            taken = recorded.get((width, height), set())
            free = [i for i in range(targets[bucket] + len(taken)) if i not in taken][:shortfall]
            tasks += [ImageTask(number, folder, class_set.prompt, generation.negative_prompt, generation.steps,
                                generation.cfg_scale, width, height, i, image_seed(base_seed, width, height, i))
                      for i in free]
    return tasks


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".tmp-{path.name}")
    temp.write_bytes(data)
    os.replace(temp, path)


def save_class_image(task: ImageTask, image) -> Path:
    """Write the PNG under its content hash, its sidecar first: an image on disk always has its record."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    stem = hashlib.sha256(data).hexdigest()[:20]
    record = {"prompt": task.prompt, "negative_prompt": task.negative_prompt, "seed": task.seed,
              "steps": task.steps, "cfg_scale": task.cfg_scale, "width": task.width, "height": task.height,
              "index": task.index}
    _write_atomically(task.folder / f"{stem}{SIDECAR_SUFFIX}", json.dumps(record, indent=1).encode())
    image_path = task.folder / f"{stem}.png"
    _write_atomically(image_path, data)
    return image_path


def _batches(tasks: list[ImageTask], batch_sizes: dict[int, int]) -> list[list[ImageTask]]:
    """Group tasks that can share a pipeline call (same concept settings and size), in batches of at most
    batch_sizes[concept]."""
    groups: dict[tuple, list[ImageTask]] = {}
    for task in tasks:
        groups.setdefault((task.concept, task.width, task.height), []).append(task)
    batches = []
    for (concept, _, _), group in groups.items():
        size = batch_sizes[concept]
        batches += [group[i:i + size] for i in range(0, len(group), size)]
    return batches


class ClassGenJob(Job):
    thread_name = "scal-sdt-classgen"

    def __init__(self, config: Config, event_queue=None, on_event=None, stop_event=None):
        super().__init__(event_queue, on_event, stop_event)
        self.config = config
        self.written: list[Path] = []

    def _run(self) -> events.Event:
        config = self.config
        tasks = plan_class_images(config)
        total = len(tasks)
        if total == 0:
            self.log("class folders are complete: nothing to generate")
            return events.Finished(step=0, summary={"generated": 0})
        resolve_model_path(config.model, config.model_sha256)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.log(f"generating {total} class images on {device}")
        family, components, pipeline = _load_pipeline(config, device, dtype)
        encoder = PromptEncoder(family, components.tokenizer, components.text_encoder, config.clip_stop_at_layer)
        done = 0
        started = time.perf_counter()
        self.emit(events.Progress(done=0, total=total))
        try:
            for batch in _batches(tasks, self._batch_sizes()):
                if self.stop_requested:
                    break
                first = batch[0]
                generators = [torch.Generator("cpu").manual_seed(t.seed) for t in batch]
                images = render(pipeline, encoder, [t.prompt for t in batch], [t.negative_prompt for t in batch],
                                num_inference_steps=first.steps, guidance_scale=first.cfg_scale,
                                width=first.width, height=first.height, generator=generators)
                for task, image in zip(batch, images):
                    path = save_class_image(task, image)
                    self.written.append(path)
                    self.emit(events.Image(path=str(path)))
                done += len(batch)
                elapsed = time.perf_counter() - started
                self.emit(events.Progress(done=done, total=total, eta_s=elapsed / done * (total - done)))
        finally:
            del pipeline
            release_memory()
        stopped = done < total
        return events.Finished(step=done, stopped=stopped, summary={"generated": done, "wanted": total})

    def _batch_sizes(self) -> dict[int, int]:
        return {number: max(1, concept.class_set.auto_generate.batch_size)
                for number, concept in enumerate(self.config.data.concepts) if concept.class_set is not None}


def _load_pipeline(config: Config, device: torch.device, dtype: torch.dtype):
    """The base model's pipeline: class images come from the model before any training."""
    family = family_for(config)
    components = family.load(config)
    pipeline = family.pipeline(components, components.unet, components.text_encoder, device)
    return family, components, pipeline.to(dtype=dtype)


def cmd_gen_class(args) -> int:
    from tqdm import tqdm

    bar = None

    def show(event: events.Event) -> None:
        nonlocal bar
        if isinstance(event, events.Log):
            tqdm.write(f"{event.level}: {event.message}")
        elif isinstance(event, events.Progress):
            bar = bar or tqdm(total=event.total, unit="image")
            bar.update(event.done - bar.n)

    result = ClassGenJob(load(args.config, args.set), on_event=show).run()
    if bar is not None:
        bar.close()
    if isinstance(result, events.Failed):
        if result.user_error:
            raise UserError(result.error)
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    print(f"generated {result.summary['generated']} class images")
    return 0


def register(commands) -> None:
    parser = commands.add_parser("gen-class", help="generate the missing class (regularization) images")
    parser.add_argument("--config", required=True, help="YAML config file")
    add_overrides_argument(parser)
    parser.set_defaults(func=cmd_gen_class)
