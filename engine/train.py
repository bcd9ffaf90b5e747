"""The training loop: plain PyTorch, readable top to bottom.

A Trainer runs in the caller's thread (`run`) or a background thread (`start`) and reports through typed
events on a queue. One optimizer step is: for each micro-batch, encode images to latents, add noise at
random timesteps, predict the noise with the UNet, take the MSE (instance + weighted prior part) and
backpropagate; then clip, step the optimizer and the LR schedule, and log.
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoints, distributed, events, notices, paths
from .buckets import plan_buckets
from .config import PRECISIONS, Config, dump_yaml, load, to_dict
from .data import Collate, DreamBoothDataset
from .dataset_index import scan_folder
from .errors import UserError
from .job import Job
from .losses import dreambooth_loss, min_snr_weights, training_target
from .models import (Components, enable_text_encoder_checkpointing, enable_xformers_if_usable, encode_prompt,
                     load_components, resolve_model_path)



class RowNoise:
    """The random draws of one batch, made per row from that sample's own key.

    A sample's latent noise, diffusion noise and timestep depend only on (seed, epoch, image), not on
    the batch it landed in, the process that drew it or what ran before: resumed runs and multi-GPU runs
    see exactly the draws of an uninterrupted single-process run.
    """

    def __init__(self, keys: torch.Tensor, num_timesteps: int):
        self.generators = [torch.Generator().manual_seed(int(k)) for k in keys]
        self.num_timesteps = num_timesteps

    def _per_row(self, shape, draw) -> torch.Tensor:
        return torch.stack([draw(shape, g) for g in self.generators])

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        eps = self._per_row(mean.shape[1:], lambda shape, g: torch.randn(shape, generator=g))
        return mean + std * eps.to(mean.device, mean.dtype)

    def noise_and_timesteps(self, shape, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        noise = self._per_row(shape[1:], lambda s, g: torch.randn(s, generator=g))
        timesteps = self._per_row((), lambda s, g: torch.randint(0, self.num_timesteps, (), generator=g))
        if offset > 0:
            # a per-channel constant teaches the model to shift overall brightness
            shift = self._per_row((shape[1], 1, 1), lambda s, g: torch.randn(s, generator=g))
            noise = noise + offset * shift
        return noise, timesteps


def optimizer_step(optimizer, scaler, params, clip_norm: Optional[float]) -> bool:
    """Clip and step through the grad scaler. False when fp16 gradients overflowed and the step was skipped."""
    if clip_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    scale_before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # The scaler lowers its scale exactly when it found inf/NaN gradients and skipped the step.
    return not (scaler.is_enabled() and scaler.get_scale() < scale_before)


def configure_noise_schedule(components: Components, config: Config) -> None:
    """Apply prediction_type and zero_terminal_snr over the model's own scheduler config."""
    overrides = {}
    if config.prediction_type:
        overrides["prediction_type"] = config.prediction_type
    if config.zero_terminal_snr:
        # Zero terminal SNR only works for sampling with trailing timesteps (Lin et al., 2023).
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if overrides:
        from diffusers import DDPMScheduler

        components.noise_scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, **overrides)


def select_device(config: Config) -> torch.device:
    wanted = config.trainer.accelerator
    if wanted in ("gpu", "cuda") and not torch.cuda.is_available():
        notices.warn("trainer.accelerator is 'gpu' but no CUDA device is available: training on the CPU")
        return torch.device("cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def select_precision(config: Config, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, use a grad scaler)."""
    name = PRECISIONS[str(config.trainer.precision)]
    if config.weights_dtype == "bf16":
        name = "bfloat16"  # bf16 weights need bf16 compute
    if name is None:
        return None, False
    if device.type != "cuda" and name == "float16":
        notices.warn("fp16 mixed precision needs CUDA: training in fp32 on the CPU")
        return None, False
    dtype = getattr(torch, name)
    return dtype, dtype == torch.float16


@dataclass
class PreparedData:
    dataset: DreamBoothDataset
    sampler: object
    loader: torch.utils.data.DataLoader
    skipped: list = field(default_factory=list)
    bucket_sizes: list = field(default_factory=list)


def prepare_data(config: Config, tokenizer, seed: int, rank: int = 0, world_size: int = 1,
                 prompt_expansions: Optional[dict] = None) -> PreparedData:
    from collections import Counter

    from .dataset_index import DataWarning
    from .sampler import BucketBatchSampler

    if not config.data.concepts:
        raise UserError("config key 'data.concepts': at least one concept with an instance_set is required")
    use_prior = config.prior_preservation.enabled
    instances, classes, skipped = [], [], []
    instance_groups, class_groups = [], []
    for index, concept in enumerate(config.data.concepts):
        found = scan_folder(paths.resolve(concept.instance_set.path), concept.instance_set.prompt,
                            f"config key 'data.concepts[{index}].instance_set.path'")
        skipped += found.skipped
        if not found.records:
            raise UserError(f"config key 'data.concepts[{index}].instance_set.path': no usable images in "
                            f"{concept.instance_set.path} ({len(found.skipped)} skipped; formats: jpg, png, webp, bmp)")
        instances += found.records
        instance_groups += [index] * len(found.records)
        if use_prior and concept.class_set is not None:
            found = scan_folder(paths.resolve(concept.class_set.path), concept.class_set.prompt,
                                f"config key 'data.concepts[{index}].class_set.path'")
            skipped += found.skipped
            if not found.records:
                raise UserError(f"config key 'data.concepts[{index}].class_set.path': no class images in "
                                f"{concept.class_set.path}; generate them first (python -m engine gen-class) "
                                "or set prior_preservation.enabled: false")
            classes += found.records
            class_groups += [index] * len(found.records)
    instance_plan = plan_buckets(config, instances)
    class_plan = plan_buckets(config, classes, sizes=instance_plan.sizes) if classes else None
    skipped += instance_plan.skipped + (class_plan.skipped if class_plan else [])
    if not instance_plan.kept:
        raise UserError("no usable training images in the instance folders (all were skipped)")
    instance_groups = [instance_groups[i] for i in instance_plan.indices]
    class_groups = [class_groups[i] for i in class_plan.indices] if class_plan else []
    unpaired = sorted(set(instance_groups) - set(class_groups)) if class_plan else []
    if unpaired:
        raise UserError(f"config key 'data.concepts[{unpaired[0]}].class_set.path': every class image was "
                        "skipped (see the warnings); add usable class images or set prior_preservation.enabled: false")
    dataset = DreamBoothDataset(
        instance_plan.kept, instance_plan.assignments, instance_plan.sizes, tokenizer,
        center_crop=config.data.center_crop, seed=seed,
        classes=class_plan.kept if class_plan else (), class_buckets=class_plan.assignments if class_plan else (),
        uncond_p=config.uncond.p if config.uncond.enabled else 0.0, captions=config.captions,
        augment=config.augment, prompt_expansions=prompt_expansions, instance_groups=instance_groups,
        class_groups=class_groups)
    sampler = BucketBatchSampler(instance_plan.assignments, config.batch_size, seed, rank=rank,
                                 world_size=world_size)
    stranded = sum(n for n in Counter(instance_plan.assignments).values() if n < world_size)
    if stranded:
        notices.warn(f"{stranded} training images are in aspect-ratio buckets holding fewer images than the "
                      f"{world_size} processes and are never trained on; add images of similar shape or use "
                      "fewer GPUs", DataWarning)
    workers = config.num_workers if config.num_workers is not None else min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        collate_fn=Collate(tokenizer.pad_token_id, tokenizer.model_max_length, config.pad_tokens),
        generator=torch.Generator().manual_seed(seed))
    return PreparedData(dataset, sampler, loader, skipped, instance_plan.sizes)


class Trainer(Job):
    thread_name = "scal-sdt-train"

    def __init__(self, config: Config, event_queue: Optional[queue.Queue] = None,
                 resume_dir: Optional[str] = None, on_event: Optional[Callable] = None):
        super().__init__(event_queue, on_event)
        self.config = config
        self.resume_dir = Path(resume_dir) if resume_dir else None
        self.run_dir: Optional[Path] = None

    @classmethod
    def for_resume(cls, run_dir: str, event_queue=None, overrides: Optional[list[str]] = None, **kwargs):
        config_path = Path(run_dir) / "config.yaml"
        if not config_path.is_file():
            raise UserError(f"--resume: {run_dir} is not a run folder (no config.yaml)")
        return cls(load(config_path, overrides), event_queue, resume_dir=run_dir, **kwargs)

    def failure_context(self) -> str:
        return str(self.run_dir or "")

    def _run(self) -> events.Event:
        with notices.collect(lambda message: self.log(message, "warning")):
            return self._train()

    def _generate_missing_class_images(self) -> None:
        """Fill auto-generated class folders first, so that a DreamBooth preset runs with one click."""
        from .classgen import ClassGenJob, plan_class_images

        missing = plan_class_images(self.config)
        if not missing:
            return
        self.log(f"generating {len(missing)} missing class images first")
        result = ClassGenJob(self.config, on_event=self.emit, stop_event=self._stop).run_inline()
        if result.stopped:
            self.log("class image generation was stopped", "warning")

    # -- the run ------------------------------------------------------------------------------------------
    def _train(self) -> events.Event:
        device = select_device(self.config)
        topology = distributed.init_from_environment(use_cuda=device.type == "cuda")
        try:
            with contextlib.ExitStack() as cleanup:
                return self._train_in_group(topology, device, cleanup)
        finally:
            # the finished job must not keep the models alive (the app holds on to its last job)
            self._unet = self._text_encoder = None
            distributed.shutdown(topology)

    def _open_run_dir(self, topology: distributed.Topology) -> Optional[Path]:
        """Set self.run_dir: the resumed run's folder, or a new one with the resolved config (and its seed)
        written by the main process. Returns the checkpoint to resume from, if resuming."""
        config = self.config
        if self.resume_dir is not None:
            self.run_dir = self.resume_dir
            if topology.is_main:
                for removed in checkpoints.clean_partial(self.run_dir):
                    self.log(f"removed an incomplete checkpoint: {removed.name}", "warning")
            distributed.barrier(topology)
            resume_from = checkpoints.latest_checkpoint(self.run_dir)
            if resume_from is None:
                raise UserError(f"--resume: {self.run_dir} has no complete checkpoint to resume from")
            return resume_from
        if config.seed is None:
            config.seed = random.randrange(2**31)
        config.seed = distributed.broadcast_from_main(topology, config.seed)
        run_dir = None
        if topology.is_main:
            run_dir = checkpoints.new_run_dir(paths.resolve(config.output_dir), config.project)
            (run_dir / "config.yaml").write_text(dump_yaml(config), encoding="utf-8")
        self.run_dir = Path(distributed.broadcast_from_main(topology, str(run_dir) if run_dir else None))
        return None

    def _prepare_models(self, components: Components, device: torch.device) -> str:
        """Freeze what is not trained, switch on the memory features, move to the device. Returns the
        attention backend in use."""
        config = self.config
        unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
        vae.requires_grad_(False)
        text_encoder.requires_grad_(config.train_text_encoder)
        if config.train_text_encoder and config.clip_stop_at_layer > 1:
            # CLIP skip never runs the last layers: freezing them keeps DDP from waiting for their gradients.
            layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
            for layer in layers[len(layers) - (config.clip_stop_at_layer - 1):]:
                layer.requires_grad_(False)
        unet.train()
        text_encoder.train(config.train_text_encoder)
        vae.eval()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                enable_text_encoder_checkpointing(text_encoder)
        attention = enable_xformers_if_usable(unet, config.xformers)
        for model in (unet, text_encoder, vae):
            model.to(device)
        if config.weights_dtype == "bf16":
            for model in [unet] + ([text_encoder] if config.train_text_encoder else []):
                model.to(torch.bfloat16)
        return attention

    def _build_optimizer(self, params: list, effective_batch: int, total_steps: int, seed: int):
        """(optimizer, LR schedule). Fused backward and bf16 weights need one optimizer per parameter,
        whose learning rate the schedule drives through a placeholder optimizer."""
        from .optim import PerParameterOptimizer, build_optimizer, build_scheduler, scaled_lr

        config = self.config
        lr = scaled_lr(config.optimizer, effective_batch)
        if config.optimizer.fused_backward or config.weights_dtype == "bf16":
            optimizer = PerParameterOptimizer(config.optimizer, params, lr, fused=config.optimizer.fused_backward,
                                              bf16_weights=config.weights_dtype == "bf16", seed=seed)
            return optimizer, build_scheduler(config.optimizer, optimizer.proxy, total_steps)
        optimizer = build_optimizer(config.optimizer, params, lr)
        return optimizer, build_scheduler(config.optimizer, optimizer, total_steps)

    def _train_in_group(self, topology: distributed.Topology, device: torch.device,
                        cleanup: contextlib.ExitStack) -> events.Event:
        config = self.config
        rank, world_size, is_main = topology.rank, topology.world_size, topology.is_main
        autocast_dtype, use_scaler = select_precision(config, device)

        resolve_model_path(config.model)  # fail before creating a run folder
        resume_from = self._open_run_dir(topology)
        seed = config.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

        if config.prior_preservation.enabled:
            distributed.main_first(topology, self._generate_missing_class_images, then_others=False)
            if distributed.any_rank(topology, self.stop_requested, device):
                return events.Finished(run_dir=str(self.run_dir), step=0, stopped=True)
        components = load_components(config.model, config.vae, config.tokenizer)
        configure_noise_schedule(components, config)
        expansions = {}
        if config.custom_embeddings.enabled:
            from .embeddings import load_custom_embeddings

            expansions = load_custom_embeddings(paths.resolve(config.custom_embeddings.path),
                                                components.tokenizer, components.text_encoder)
            self.log(f"loaded custom embeddings: {', '.join(expansions)}")
        unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
        attention = self._prepare_models(components, device)

        data = prepare_data(config, components.tokenizer, seed, rank, world_size, expansions)
        from .cache import attach_caches

        # The main process fills the caches; the other ranks then find them full.
        text_cache = distributed.main_first(
            topology, lambda: attach_caches(config, components, data.dataset, device, autocast_dtype, self.log))
        if config.aspect_ratio_bucket.debug:
            for bucket, (width, height) in enumerate(data.bucket_sizes):
                count = data.dataset.instance_buckets.count(bucket)
                if count:
                    self.log(f"bucket {width}x{height}: {count} images")
        batches_per_epoch = len(data.sampler)
        if batches_per_epoch == 0:
            raise UserError(f"no batch can be formed: every bucket holds fewer images than the {world_size} "
                            "processes; add images or train on fewer devices")
        accumulate = config.trainer.accumulate_grad_batches
        steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
        total_steps = min(s for s in (config.trainer.max_steps,
                                      config.trainer.max_epochs and config.trainer.max_epochs * steps_per_epoch)
                          if s is not None)

        trained = [unet] + ([text_encoder] if config.train_text_encoder else [])
        params = [p for model in trained for p in model.parameters() if p.requires_grad]
        # The forward passes go through the DDP wrappers so that backward averages gradients over ranks.
        self._unet = distributed.wrap(unet, topology, device)
        self._text_encoder = (distributed.wrap(text_encoder, topology, device) if config.train_text_encoder
                              else text_encoder)
        per_parameter = config.optimizer.fused_backward or config.weights_dtype == "bf16"
        optimizer, lr_scheduler = self._build_optimizer(params, config.batch_size * accumulate * world_size,
                                                        total_steps, seed)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        from .ema import EMA_FOLDER, SwapInEma, create_ema, ema_step, load_ema

        global_step, epoch, position = 0, 0, 0
        metrics_resume_step = None
        if resume_from is not None:
            state = checkpoints.load_state(resume_from)
            checkpoints.load_model_weights(unet, resume_from, "unet")
            if config.train_text_encoder:
                checkpoints.load_model_weights(text_encoder, resume_from, "text_encoder")
        # Only the main process samples and saves, so only it keeps the average.
        ema = None
        if config.ema.enabled and is_main:
            if resume_from is not None and (resume_from / EMA_FOLDER).is_dir():
                ema = load_ema(resume_from, config.ema, device)
            else:
                if resume_from is not None:
                    self.log(f"{resume_from.name} has no EMA weights: the average starts from the resumed weights",
                             "warning")
                ema = create_ema(unet, config.ema)
        if resume_from is not None:
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            scaler.load_state_dict(state["scaler"])
            random.setstate(state["rng"]["python"])
            np.random.set_state(state["rng"]["numpy"])
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
            global_step, epoch, position = state["global_step"], state["sampler"]["epoch"], state["sampler"]["position"]
            metrics_resume_step = global_step
            self.log(f"resuming {self.run_dir} from {resume_from.name} (step {global_step})")

        from .loggers import ExternalLoggers, MetricsLog

        metrics = MetricsLog(self.run_dir / "metrics.jsonl", metrics_resume_step) if is_main else None
        external = ExternalLoggers(config, self.run_dir, to_dict(config)) if is_main else None
        if is_main:  # closed however the run ends, so W&B and TensorBoard keep what was logged
            cleanup.callback(metrics.close)
            cleanup.callback(external.close)
        self.emit(events.Started(run_dir=str(self.run_dir), total_steps=total_steps, start_step=global_step))
        self.log(f"{len(data.dataset)} training images, {len(data.skipped)} skipped; {batches_per_epoch} batches "
                 f"per epoch; {total_steps} steps; device {device}; attention {attention}")

        def save(reason: str) -> Path:
            state = {
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "global_step": global_step, "overflow_steps": overflow_steps, "sampler": {"epoch": epoch, "position": batch_index_in_epoch},
            }
            models = {"unet": unet}
            if config.train_text_encoder:
                models["text_encoder"] = text_encoder
            if ema is not None:
                models[EMA_FOLDER] = ema
            meta = {"epoch": epoch, "base_model": components.model_path, "reason": reason,
                    "trained": sorted(models), "prediction_type": components.noise_scheduler.config.prediction_type}
            path = checkpoints.save_checkpoint(self.run_dir, global_step, models, state, meta,
                                               config.checkpoint.save_top_k)
            self.emit(events.CheckpointSaved(step=global_step, path=str(path)))
            return path

        def sample() -> None:
            from .sampling import build_pipeline, generate_samples

            # With both caches on, the VAE and text encoder wait off the device: put them back after sampling.
            resting = {model: next(model.parameters()).device for model in (vae, text_encoder)}
            pipeline = build_pipeline(components, unet, text_encoder, device)
            with SwapInEma(ema if config.ema.use_for_samples else None, unet.parameters()):
                sample_paths = generate_samples(config, pipeline, self.run_dir / "samples" / f"{global_step:06d}",
                                                autocast_dtype)
            for model, home in resting.items():
                model.to(home)
            text_encoder.train(config.train_text_encoder)
            self.emit(events.Sample(step=global_step, paths=sample_paths))
            external.log_images(global_step, sample_paths)

        step_times: list[float] = []
        overflow_steps = state["overflow_steps"] if resume_from is not None else 0
        last_sampled = -1
        stopped = False
        batch_index_in_epoch = position
        loss_sum, loss_count = 0.0, 0
        tick = time.perf_counter()
        while global_step < total_steps and not stopped:
            data.sampler.set_epoch(epoch, start=position)
            data.dataset.set_epoch(epoch)
            epoch_batches = batches_per_epoch
            batch_index_in_epoch = position
            for batch in data.loader:
                group_start = batch_index_in_epoch // accumulate * accumulate
                group_size = min(accumulate, epoch_batches - group_start)
                loss, parts = self._forward(batch, components, device, autocast_dtype, text_cache)
                finite = bool(torch.isfinite(loss))
                if distributed.any_rank(topology, not finite, device):
                    value = "non-finite on another process" if finite else loss.item()
                    raise UserError(f"the loss became {value} at step {global_step + 1}; stopping. "
                                    f"The last good checkpoint is kept in {self.run_dir / 'checkpoints'}; "
                                    "lower optimizer.params.lr or use bf16/fp32 precision")
                last_of_group = batch_index_in_epoch + 1 - group_start == group_size
                # Ranks exchange gradients only on the micro-batch that completes an accumulation group.
                if config.optimizer.fused_backward:
                    optimizer.armed = last_of_group  # parameters step inside this backward
                with contextlib.nullcontext() if last_of_group else self._no_sync():
                    scaler.scale(loss / group_size).backward()
                loss_sum += loss.item()
                loss_count += 1
                batch_index_in_epoch += 1
                if batch_index_in_epoch - group_start < group_size:
                    continue

                if not per_parameter:
                    if not optimizer_step(optimizer, scaler, params, config.trainer.gradient_clip_val):
                        overflow_steps += 1
                elif not config.optimizer.fused_backward:
                    if config.trainer.gradient_clip_val:
                        torch.nn.utils.clip_grad_norm_(params, config.trainer.gradient_clip_val)
                    optimizer.step()
                if ema is not None:
                    ema_step(ema, unet.parameters(), config.ema.on_cpu)
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1

                now = time.perf_counter()
                step_times.append(now - tick)
                tick = now
                recent = step_times[-20:]
                it_per_s = len(recent) / sum(recent) if sum(recent) > 0 else 0.0
                record = {"step": global_step, "epoch": epoch,
                          "loss": distributed.mean_over_ranks(topology, loss_sum / loss_count, device),
                          "lr": optimizer.param_groups[0]["lr"], "width": parts["width"], "height": parts["height"]}
                if use_scaler:
                    record["overflow_steps"] = overflow_steps
                if parts.get("prior_loss") is not None:
                    record["instance_loss"], record["prior_loss"] = parts["instance_loss"], parts["prior_loss"]
                loss_sum, loss_count = 0.0, 0
                if is_main and (global_step % config.trainer.log_every_n_steps == 0 or global_step == total_steps):
                    metrics.write(record)
                    external.log(record)
                self.emit(events.Step(step=global_step, epoch=epoch, loss=record["loss"], lr=record["lr"],
                                      it_per_s=it_per_s, total_steps=total_steps,
                                      eta_s=(total_steps - global_step) / it_per_s if it_per_s else 0.0))
        
                if is_main and config.sampling.concepts and config.sampling.interval_steps and \
                        global_step % config.sampling.interval_steps == 0:
                    sample()
                    last_sampled = global_step
                    tick = time.perf_counter()
                every = config.checkpoint.every_n_train_steps
                if is_main and every and global_step % every == 0:
                    save("every_n_train_steps")
                if distributed.any_rank(topology, self.stop_requested, device):
                    stopped = True
                    break
                if global_step >= total_steps:
                    break
            else:
                position = 0
                epoch += 1
                # As in Lightning's ModelCheckpoint, every_n_train_steps replaces every_n_epochs when set.
                every_epochs = None if config.checkpoint.every_n_train_steps else config.checkpoint.every_n_epochs
                if is_main and every_epochs and epoch % every_epochs == 0 and global_step < total_steps:
                    batch_index_in_epoch = 0
                    save("every_n_epochs")
                continue
            position = batch_index_in_epoch
            if position >= epoch_batches:
                position, epoch, batch_index_in_epoch = 0, epoch + 1, 0

        if is_main:
            if config.sampling.concepts and config.sampling.interval_steps and last_sampled != global_step \
                    and not stopped:
                sample()
            if not stopped or self._save_on_stop:
                latest = checkpoints.latest_checkpoint(self.run_dir)
                if latest is None or checkpoints.read_meta(latest)["step"] != global_step:
                    save("stop" if stopped else "end")
        summary = {"steps": global_step, "images": len(data.dataset), "skipped": len(data.skipped),
                   "skipped_reasons": [{"path": p, "reason": r} for p, r in data.skipped]}
        return events.Finished(run_dir=str(self.run_dir), step=global_step, stopped=stopped, summary=summary)

    def _no_sync(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for model in (self._unet, self._text_encoder):
            if hasattr(model, "no_sync"):
                stack.enter_context(model.no_sync())
        return stack

    def _forward(self, batch: dict, components: Components, device: torch.device,
                 autocast_dtype: Optional[torch.dtype], text_cache=None) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch; latents and embeddings come from the caches when the batch or
        text_cache (a cache.TextEmbeddingCache) provide them."""
        config = self.config
        vae, scheduler = components.vae, components.noise_scheduler
        prediction_type = scheduler.config.prediction_type
        input_ids = batch["input_ids"].to(device)
        draws = RowNoise(batch["sample_keys"], scheduler.config.num_train_timesteps)
        with torch.no_grad():
            if "latent_params" in batch:
                from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

                distribution = DiagonalGaussianDistribution(batch["latent_params"].to(device))
            else:
                distribution = vae.encode(batch["pixel_values"].to(device)).latent_dist
            latents = draws.sample_latents(distribution.mean, distribution.std) * vae.config.scaling_factor
        noise, timesteps = draws.noise_and_timesteps(latents.shape, config.noise_offset)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            if text_cache is not None:
                encoder_hidden_states = text_cache.lookup(input_ids).to(device)
            else:
                with torch.set_grad_enabled(config.train_text_encoder):
                    encoder_hidden_states = encode_prompt(self._text_encoder, input_ids, config.clip_stop_at_layer)
            if config.uncond.enabled and config.uncond.cond == "zeros":
                dropped = torch.tensor([c == "" for c in batch["captions"]], device=device)
                encoder_hidden_states = encoder_hidden_states * (~dropped).view(-1, 1, 1).to(encoder_hidden_states.dtype)
            prediction = self._unet(noisy_latents, timesteps, encoder_hidden_states).sample
        target = training_target(scheduler, latents, noise, timesteps, prediction_type)
        weights = (min_snr_weights(scheduler, timesteps, config.min_snr_gamma, prediction_type)
                   if config.min_snr_gamma else None)
        loss, instance_loss, prior_loss = dreambooth_loss(prediction, target, batch["num_instance"],
                                                          config.prior_preservation.prior_loss_weight, weights)
        pixels_per_latent = 2 ** (len(vae.config.block_out_channels) - 1)
        parts = {"instance_loss": instance_loss.item(),
                 "prior_loss": prior_loss.item() if prior_loss is not None else None,
                 "width": latents.shape[-1] * pixels_per_latent, "height": latents.shape[-2] * pixels_per_latent}
        return loss, parts
