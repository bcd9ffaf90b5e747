"""The training data of a run: the instance and class folders scanned and bucketed, the dataset, its
batch sampler (sharded over ranks) and the data loader.

The records stay lazy throughout (see records): the concepts' scans are chained, selected and repeated
as index columns, so that a record is built only when the dataset makes an example of it.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .. import notices, paths
from ..config import Config
from ..errors import UserError
from .buckets import plan_buckets
from .controls import check_counts, concept_controls
from .dataset import Collate, DreamBoothDataset
from .index import DataWarning
from .masks import check_masks, concept_masks
from .records import ImageRecord, LazyRecords, RecordChain
from .sampler import BucketBatchSampler
from .sources import scan_images


@dataclass
class PreparedData:
    dataset: DreamBoothDataset
    sampler: object
    loader: torch.utils.data.DataLoader
    skipped: list = field(default_factory=list)
    bucket_sizes: list = field(default_factory=list)
    images: int = 0  # distinct training images; the dataset holds each image once per repeat
    held_out: Sequence[ImageRecord] = ()  # instance images kept out of training by validation.split


def prepare_data(config: Config, tokenizer, seed: int, rank: int = 0, world_size: int = 1,
                 prompt_expansions: Optional[dict] = None, pin_memory: bool = False) -> PreparedData:
    if not config.data.concepts:
        raise UserError("config key 'data.concepts': at least one concept with an instance_set is required")
    use_prior = config.prior_preservation.enabled
    # Per concept: its lazy records, and a column of its index, one per record.
    instances, classes, skipped, held_out = [], [], [], []
    instance_groups, class_groups = [], []
    masks = {} if config.masked_loss.enabled else None
    # an edit model trains on (control, target) pairs
    controls = {} if getattr(tokenizer, "reads_controls", False) else None
    for index, concept in enumerate(config.data.concepts):
        found = scan_images(paths.resolve(concept.instance_set.path), concept.instance_set.prompt,
                            f"config key 'data.concepts[{index}].instance_set.path'")
        skipped += found.skipped
        if not found.records:
            raise UserError(f"config key 'data.concepts[{index}].instance_set.path': no usable images in "
                            f"{concept.instance_set.path} ({len(found.skipped)} skipped; formats: jpg, png, webp, bmp)")
        if masks is not None:
            masks.update(concept_masks(concept.instance_set, index, found.records))
        if controls is not None:
            controls.update(concept_controls(concept.instance_set, index, found.records))
        kept = found.records
        if config.validation.split > 0:
            kept, held = hold_out(kept, config.validation.split, config.validation.seed, index)
            held_out.append(held)
        instances.append(kept)
        instance_groups.append(np.full(len(kept), index, dtype=np.int64))
        if use_prior and concept.class_set is not None:
            found = scan_images(paths.resolve(concept.class_set.path), concept.class_set.prompt,
                                f"config key 'data.concepts[{index}].class_set.path'")
            skipped += found.skipped
            if not found.records:
                raise UserError(f"config key 'data.concepts[{index}].class_set.path': no class images in "
                                f"{concept.class_set.path}; generate them first (python -m engine gen-class) "
                                "or set prior_preservation.enabled: false")
            classes.append(found.records)
            class_groups.append(np.full(len(found.records), index, dtype=np.int64))
    held_out = RecordChain(held_out)
    if config.validation.split > 0 and not held_out:
        raise UserError(f"config key 'validation.split': {config.validation.split} of each concept's images "
                        "rounds to no image at all; raise it, or name a folder in validation.path instead")
    instance_plan = plan_buckets(config, RecordChain(instances))
    class_plan = plan_buckets(config, RecordChain(classes), sizes=instance_plan.sizes) if classes else None
    skipped += instance_plan.skipped + (class_plan.skipped if class_plan else [])
    if not instance_plan.kept:
        raise UserError("no usable training images in the instance folders (all were skipped)")
    if masks is not None:
        check_masks(masks, instance_plan.kept)
    if controls is not None:
        check_counts(controls, "config key 'data.concepts'")
    instance_groups = np.concatenate(instance_groups)[instance_plan.indices]
    class_groups = (np.concatenate(class_groups)[class_plan.indices] if class_plan
                    else np.zeros(0, dtype=np.int64))
    unpaired = sorted(set(instance_groups.tolist()) - set(class_groups.tolist())) if class_plan else []
    if unpaired:
        raise UserError(f"config key 'data.concepts[{unpaired[0]}].class_set.path': every class image was "
                        "skipped (see the warnings); add usable class images or set prior_preservation.enabled: false")
    # Each image is `repeats` samples of an epoch; the copies are separate indices of the dataset, so each
    # draws its own crop, caption dropout, noise and class image.
    repeats = np.array([concept.instance_set.repeats for concept in config.data.concepts], dtype=np.int64)
    # Each kept image's position, `repeats` times in a row.
    samples = np.repeat(np.arange(len(instance_groups)), repeats[instance_groups])
    sample_buckets = np.asarray(instance_plan.assignments, dtype=np.int64)[samples].tolist()
    dataset = DreamBoothDataset(
        instance_plan.kept.take(samples), sample_buckets, instance_plan.sizes, tokenizer,
        center_crop=config.data.center_crop, seed=seed,
        classes=class_plan.kept if class_plan else (), class_buckets=class_plan.assignments if class_plan else (),
        uncond_p=config.uncond.p if config.uncond.enabled else 0.0, captions=config.captions,
        augment=config.augment, prompt_expansions=prompt_expansions,
        instance_groups=instance_groups[samples].tolist(), class_groups=class_groups.tolist(), masks=masks,
        controls=controls)
    sampler = BucketBatchSampler(sample_buckets, config.batch_size, seed, rank=rank, world_size=world_size)
    stranded = sum(n for n in Counter(sample_buckets).values() if n < world_size)
    if stranded:
        notices.warn(f"{stranded} training images are in aspect-ratio buckets holding fewer images than the "
                      f"{world_size} processes and are never trained on; add images of similar shape or use "
                      "fewer GPUs", DataWarning)
    workers = config.num_workers if config.num_workers is not None else min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        # pinned batches copy to a GPU while it computes (the step's copies do not wait for them)
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        collate_fn=Collate(tokenizer.pad_token_id, tokenizer.model_max_length, config.pad_tokens),
        generator=torch.Generator().manual_seed(seed))
    return PreparedData(dataset, sampler, loader, skipped, instance_plan.sizes, images=len(instance_plan.kept),
                        held_out=held_out)


def hold_out(records: LazyRecords, fraction: float, seed: int, concept: int) -> tuple[LazyRecords, LazyRecords]:
    """(training, held-out) images of one concept, each in the records' order: fraction x count of them
    (rounded) held out, chosen by the validation seed alone, so that the same images stay out whatever
    the run's own seed."""
    count = math.floor(fraction * len(records) + 0.5)
    if count >= len(records):
        raise UserError(f"config key 'validation.split': {fraction} of the {len(records)} images of "
                        f"data.concepts[{concept}] leaves none to train on; lower it")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, concept, 0x5E1])
    held = np.zeros(len(records), dtype=bool)
    held[rng.choice(len(records), size=count, replace=False)] = True
    return records.take(np.flatnonzero(~held)), records.take(np.flatnonzero(held))
