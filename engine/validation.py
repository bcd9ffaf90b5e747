"""Validation loss: the plain denoising loss of held-out images at fixed timesteps, with fixed noise.

Each image's noise comes from a generator keyed by (validation.seed, image index) and is the same at every
listed timestep and in every round, so val_loss moves only with the weights: rounds of one run, and runs
that share their validation images and seed, compare directly. The loss is the MSE against the training
target (the objective's: epsilon, v or the flow) without loss weights or noise offset, over centre crops in the run's bucket sizes
with no augmentation or caption dropout. Nothing here draws from the global RNGs or from the training
data's streams, the models go back to their own train/eval modes, and the trainer scores a schedule-free
optimizer's evaluation weights inside optim.eval_weights, which restores the training weights exactly, so a
run trains to the same weights with validation on or off.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from . import paths
from .config import Config
from .data.buckets import plan_buckets
from .data.controls import controls_beside
from .data.dataset import Collate, DreamBoothDataset
from .data.index import ImageRecord
from .data.sources import scan_images
from .errors import UserError
from .step import StepModels, compute_loss

# Keeps validation's keys apart from the training data's (seed, epoch, index) streams.
NOISE_STREAM = 0x7A1


def noise_key(seed: int, index: int) -> int:
    """The key of the generator that draws validation image `index`'s latent sample and noise (in the order
    step.RowNoise draws them)."""
    return int(np.random.default_rng([seed & 0xFFFFFFFF, index, NOISE_STREAM]).integers(2**62))


@dataclass
class ValidationSet:
    dataset: DreamBoothDataset  # centre crops, captions as written
    batches: list[list[int]]    # dataset indices, one bucket size per batch
    collate: Collate
    timesteps: list[int]
    seed: int

    def __len__(self) -> int:
        return len(self.dataset)


def build_validation_set(config: Config, tokenizer, scheduler, held_out: Sequence[ImageRecord],
                         sizes: Sequence[tuple[int, int]],
                         prompt_expansions: Optional[dict] = None) -> Optional[ValidationSet]:
    """The run's validation images (validation.path, or those validation.split held out) in the run's bucket
    sizes, in batches of batch_size; None while validation is off."""
    settings = config.validation
    if not settings.every_n_steps:
        return None
    length = scheduler.config.num_train_timesteps
    beyond = [t for t in settings.timesteps if t >= length]
    if beyond:
        raise UserError(f"config key 'validation.timesteps': the model's noise schedule has timesteps 0 to "
                        f"{length - 1}, got {beyond}")
    if settings.path:
        key = "validation.path"
        records = scan_images(paths.resolve(settings.path), settings.prompt, f"config key '{key}'").records
    else:
        key, records = "validation.split", list(held_out)
    plan = plan_buckets(config, records, sizes=sizes)
    if not plan.kept:
        raise UserError(f"config key '{key}': no usable validation images (see the warnings; formats: jpg, png, "
                        "webp, bmp)")
    # an edit model's pairs: each image's control beside it (see data.controls)
    controls = (controls_beside(plan.kept, f"config key '{key}'") if getattr(tokenizer, "reads_controls", False)
                else None)
    dataset = DreamBoothDataset(plan.kept, plan.assignments, plan.sizes, tokenizer, center_crop=True,
                                seed=settings.seed, prompt_expansions=prompt_expansions, controls=controls)
    batches = []
    for bucket in sorted(set(plan.assignments)):
        items = [i for i, b in enumerate(plan.assignments) if b == bucket]
        batches += [items[start:start + config.batch_size] for start in range(0, len(items), config.batch_size)]
    collate = Collate(tokenizer.pad_token_id, tokenizer.model_max_length, config.pad_tokens)
    return ValidationSet(dataset, batches, collate, list(settings.timesteps), settings.seed)


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module):
    """Every module of models in eval mode (no dropout), each put back in its own mode afterwards."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def validation_loss(config: Config, models: StepModels, validation: ValidationSet, device: torch.device,
                    autocast_dtype: Optional[torch.dtype]) -> dict[int, float]:
    """The mean loss over every validation image at each timestep. `models` are the plain modules, not the
    DDP wrappers: only the main process validates."""
    plain = dataclasses.replace(config, noise_offset=0.0)
    models = dataclasses.replace(models, objective=models.objective.unweighted())
    totals = dict.fromkeys(validation.timesteps, 0.0)
    with torch.no_grad(), evaluating(models.unet, models.text_encoder):
        for indices in validation.batches:
            batch = validation.collate([validation.dataset[i] for i in indices])
            batch["sample_keys"] = torch.tensor([noise_key(validation.seed, i) for i in indices], dtype=torch.long)
            for timestep in validation.timesteps:
                loss, _ = compute_loss(plain, models, batch, device, autocast_dtype,
                                       timesteps=torch.full((len(indices),), timestep, dtype=torch.long))
                totals[timestep] += loss.item() * len(indices)  # CPU–GPU sync
    return {timestep: total / len(validation) for timestep, total in totals.items()}


def validation_metrics(per_timestep: dict[int, float]) -> dict[str, float]:
    """The metrics line's val_loss (the mean over the timesteps) and val_loss_t<timestep> values."""
    return {"val_loss": sum(per_timestep.values()) / len(per_timestep),
            **{f"val_loss_t{timestep}": value for timestep, value in per_timestep.items()}}
