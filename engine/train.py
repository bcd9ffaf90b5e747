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
import shutil
import re
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoints, distributed, events, notices, paths, sharding
from .config import Config, ConfigError, dump_yaml, load, to_dict
from .data.prepare import PreparedData, prepare_data
from .ema import averaged_parameters, ema_step
from .errors import UserError
from .job import Job, release_memory
from .models.family import ModelFamily, family_for
from .models.sd import Components, resolve_model_path
from .optim import checkpoint_weights, eval_weights, scaled_lr, train_mode
from .plan import RunPlan, make_plan
from .run_dir import CONFIG_FILE, RunDir, RunLock
from .sampling import PromptEncoder, generate_samples
from .models import kohya
from .models.adapters import AdapterWeights, load_adapter_folder
from .setup import build_optimizer, build_schedule, parameter_groups, prepare_models, trained_parts
from .step import LossParts, StepModels, backward, compute_loss, optimizer_step
from .validation import build_validation_set, validation_loss, validation_metrics


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


# Settings that decide which images each batch holds; the saved data position assumes them unchanged.
DATA_POSITION_KEYS = ("batch_size", "seed", "trainer.accumulate_grad_batches", "data", "aspect_ratio_bucket",
                      "validation.split", "validation.seed")

# The keys a resume may change (with their sub-keys). The others decide what the checkpoint's state is (the
# model, what trains and its adapter's shape, the optimizer and its state's layout, precision, the loss), so a
# change there is a new run.
RESUME_KEYS = (
    # how long the run trains
    "trainer.max_steps", "trainer.max_epochs",
    # the learning rate and its schedule: the new schedule takes over at the resumed step
    "optimizer.params.lr", "network.text_encoder_lr", "optimizer.lr_scheduler",
    # which images each batch holds: allowed with a warning, the saved data position counts the old batches
    "batch_size", "seed", "trainer.accumulate_grad_batches", "data.concepts", "data.center_crop",
    "aspect_ratio_bucket", "validation",
    # what the run writes along the way, and how it uses the machine
    "checkpoint", "sampling", "loggers", "trainer.log_every_n_steps", "description", "num_workers", "cache",
    "gradient_checkpointing", "memory", "xformers", "compile", "trainer.devices", "trainer.strategy",
)


def changed_keys(before, after, prefix: str = "") -> list[str]:
    """The key paths (`a.b[0].c`) whose values differ between two config dicts; a list that changed length
    is one key."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = list(before) + [key for key in after if key not in before]
        return [changed for key in keys
                for changed in changed_keys(before.get(key), after.get(key), f"{prefix}.{key}" if prefix else key)]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [changed for index, (b, a) in enumerate(zip(before, after))
                for changed in changed_keys(b, a, f"{prefix}[{index}]")]
    return [] if before == after else [prefix]


def may_change_on_resume(key: str) -> bool:
    generic = re.sub(r"\[\d+\]", "", key)
    return any(generic == allowed or generic.startswith(allowed + ".") for allowed in RESUME_KEYS)


@dataclass
class StepContext:
    """What the step loop works with, set up once per run by Trainer._setup."""
    components: Components
    plan: RunPlan
    device: torch.device
    topology: distributed.Topology
    data: PreparedData
    models: StepModels           # what the step runs: DDP wrappers where several processes train
    params: list
    optimizer: object
    lr_scheduler: object
    scaler: torch.amp.GradScaler
    text_cache: object           # cache.TextEmbeddingCache once the text cache is full, else None
    ema: object
    prompt_encoder: PromptEncoder
    batches_per_epoch: int
    total_steps: int
    metrics: object = None       # the main process's MetricsLog and ExternalLoggers
    external: object = None
    validation: object = None    # the main process's validation.ValidationSet; None with validation off
    fill: object = None          # cache_fill.FirstEpochFill while the first epoch writes the caches
    compile_clock: object = None  # regional_compile.CompileClock with compile on


def optimizer_steps(context: StepContext, state: checkpoints.TrainState, accumulate: int):
    """The micro-batches of each optimizer step, epoch after epoch, from where state stands.

    Accumulation groups are counted from each epoch's start; an epoch's last group may be shorter."""
    data, per_epoch = context.data, context.batches_per_epoch
    while True:
        data.sampler.set_epoch(state.epoch, start=state.position)
        data.dataset.set_epoch(state.epoch)
        group, group_size = [], min(accumulate, per_epoch - state.position)
        for batch in data.loader:
            group.append(batch)
            if len(group) == group_size:
                yield group
                group, group_size = [], min(accumulate, per_epoch - state.position)


class Trainer(Job):
    thread_name = "scal-sdt-train"

    def __init__(self, config: Config, event_queue: Optional[queue.Queue] = None,
                 resume_dir: Optional[str] = None, on_event: Optional[Callable] = None,
                 saved_config: Optional[Config] = None):
        super().__init__(event_queue, on_event)
        self.config = config
        self.resume_dir = Path(resume_dir) if resume_dir else None
        # the resumed run's config as saved, and what the resume's --set changed in it
        self.saved_config = saved_config or config
        self.resume_changes = changed_keys(to_dict(self.saved_config), to_dict(config))
        self.run_dir: Optional[Path] = None
        self.state = checkpoints.TrainState()
        self._models: Optional[StepModels] = None
        self.failed_sample_rounds = 0

    @classmethod
    def for_resume(cls, run_dir: str, event_queue=None, overrides: Optional[list[str]] = None, **kwargs):
        if not RunDir.is_run(Path(run_dir)):
            raise UserError(f"--resume: {run_dir} is not a run folder (no {CONFIG_FILE})")
        path = RunDir(Path(run_dir)).config
        with notices.collect(lambda message: None):  # the config's notices come once, from the load below
            saved = load(path)
        config = load(path, overrides)
        refused = [key for key in changed_keys(to_dict(saved), to_dict(config)) if not may_change_on_resume(key)]
        if refused:
            raise ConfigError(f"--resume: config key{'s' if len(refused) > 1 else ''} "
                              f"{', '.join(repr(key) for key in refused)} cannot change on resume: the checkpoint "
                              "was trained with the run's own setting; start a new run to change it (see README, "
                              "Never losing a run)")
        return cls(config, event_queue, resume_dir=run_dir, saved_config=saved, **kwargs)

    def failure_context(self) -> str:
        return str(self.run_dir or "")

    def describe_failure(self, message: str) -> str:
        """A run that ends in an error says what is left of it."""
        if self.run_dir is None:
            return message
        latest = checkpoints.newest_intact(self.run_dir)
        if latest is None:
            return f"{message} (no intact checkpoint was saved yet)"
        return f"{message} (last good checkpoint: {latest}; continue with --resume {self.run_dir})"

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
    def _fit_memory(self) -> None:
        """memory.fit: the memory plan's settings applied to the config, one log line each; refused with the
        plan's reason when none fit. A resumed run keeps the settings its config.yaml was saved with."""
        from .memory_plan import applied, format_settings, plan_memory

        fit = self.config.memory.fit
        self.log(f"memory.fit: planning for {fit.vram_gib:g} GiB of GPU memory and {fit.ram_gib:g} GiB of RAM")
        processes = distributed.world_size_from_environment()
        plan = plan_memory(self.config, fit.vram_gib, fit.ram_gib, processes)
        if not plan.fits:
            raise UserError(f"config key 'memory.fit': nothing fits: {plan.reason}")
        for key, value in plan.settings.items():
            self.log(f"memory.fit: {format_settings({key: value})}")
        if not plan.settings:
            self.log("memory.fit: the config fits as it is")
        for note in plan.notes:
            self.log(f"memory.fit: {note}", "warning")
        self.log(f"memory.fit: estimated GPU peak {plan.estimate.peak:.2f} GiB, system RAM peak "
                 f"{plan.estimate.ram.peak:.2f} GiB")
        self.config = applied(self.config, plan.settings, processes)

    def _train(self) -> events.Event:
        if self.config.memory.fit is not None and self.resume_dir is None:
            self._fit_memory()
        device = select_device(self.config)
        # Planned (and refused, for rules that depend on the process count) before any process group or
        # run folder exists.
        plan = make_plan(self.config, device.type, distributed.world_size_from_environment())
        if self.config.compile:
            from .regional_compile import refuse_unusable

            refuse_unusable(device)
        # Downloaded (or built, for a demo model), or failed, before any run folder exists, and before joining
        # the process group: transformers' save_pretrained writes no weights on a rank other than 0 once a
        # group exists, so a demo model built there would have empty text encoders.
        resolve_model_path(self.config.model, self.config.model_sha256)
        topology = distributed.init_from_environment(use_cuda=device.type == "cuda")
        # The process group ends once the models are gone, those of a failure's frames included. DDP's reducer
        # holds the group: were it the last to let go, ending the group would wait for gloo's threads while
        # holding the GIL, which a thread finishing a collective on a Python tensor needs, and the rank would
        # hang at the end of its run. The group's own Python object lets go of the GIL before it waits.
        try:
            return self._train_in_group(plan, topology, device)
        except BaseException as failure:
            traceback.clear_frames(failure.__traceback__)
            raise
        finally:
            distributed.shutdown(topology)

    def _train_in_group(self, plan: RunPlan, topology: distributed.Topology, device: torch.device) -> events.Event:
        refused = False
        try:
            with contextlib.ExitStack() as cleanup:
                try:
                    context = self._setup(plan, topology, device, cleanup)
                except UserError:
                    refused = True
                    raise
                if context is None:
                    return events.Finished(run_dir=str(self.run_dir), step=0, stopped=True)
                result = self._train_loop(context)
                # The ranks leave together: one that tears its process group down while the main process still
                # writes the last checkpoint can have gloo abort it on its way out.
                distributed.barrier(topology)
                return result
        finally:
            # the finished job must not keep the models alive (the app holds on to its last job)
            self._models = None
            if refused and topology.is_main:
                self._discard_untrained_run_dir()

    def _discard_untrained_run_dir(self) -> None:
        """A new run refused while it set up (a folder or file its config names is missing, say) leaves no
        folder behind: the run list would fill with empty runs. Called once the folder's lock is released."""
        if self.resume_dir is None and self.run_dir is not None and RunDir(self.run_dir).holds_nothing_trained():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def _open_run_dir(self, topology: distributed.Topology, cleanup: contextlib.ExitStack) -> Optional[Path]:
        """Set self.run_dir: the resumed run's folder, or a new one with the resolved config (and its seed)
        written by the main process, which locks it until the run ends. Returns the checkpoint to resume from,
        if resuming."""
        config = self.config
        if self.resume_dir is not None:
            if topology.is_main:
                # the lock comes first: the clean-up below must not touch the files of a run still training
                cleanup.callback(RunLock.acquire(self.resume_dir).release)
                for removed in checkpoints.clean_partial(self.resume_dir):
                    self.log(f"removed an incomplete checkpoint: {removed.name}", "warning")
                for damaged, problem in checkpoints.set_aside_damaged(self.resume_dir):
                    self.log(f"checkpoint {damaged.name} is damaged ({problem}): resuming from an older one; it "
                             f"is kept as {checkpoints.DAMAGED_PREFIX}{damaged.name}", "warning")
                if self.resume_changes:
                    RunDir(self.resume_dir).update_config(dump_yaml(config))
            self.run_dir = self.resume_dir
            distributed.barrier(topology)
            resume_from = checkpoints.latest_checkpoint(self.run_dir)
            if resume_from is None:
                raise UserError(f"--resume: {self.run_dir} has no intact checkpoint to resume from")
            self._warn_of_moved_data_position()
            return resume_from
        if config.seed is None:
            config.seed = random.randrange(2**31)
        config.seed = distributed.broadcast_from_main(topology, config.seed)
        run_dir = None
        if topology.is_main:
            run_dir = RunDir.create(paths.resolve(config.output_dir), config.project)
            cleanup.callback(RunLock.acquire(run_dir.path).release)
            run_dir.config.write_text(dump_yaml(config), encoding="utf-8")
        self.run_dir = Path(distributed.broadcast_from_main(topology, str(run_dir.path) if run_dir else None))
        return None

    def _warn_of_moved_data_position(self) -> None:
        """The checkpoint's data position counts batches of the run's own settings: a resume that changes
        them does not continue exactly where the run stopped."""
        saved, now = to_dict(self.saved_config), to_dict(self.config)
        for key in DATA_POSITION_KEYS:
            before, after = saved, now
            for part in key.split("."):
                before, after = before.get(part), after.get(part)
            if before != after:
                self.log(f"--set {key} changes what the saved data position counts ({before!r} -> {after!r}): "
                         "the resumed run will not see exactly the images it would have seen", "warning")

    def _load_models(self, family: ModelFamily, plan: RunPlan,
                     device: torch.device) -> tuple[Components, dict, str]:
        """The base model with its noise schedule and custom embeddings, prepared for training.
        Returns (components, textual-inversion expansions, attention backend)."""
        config = self.config
        components = family.load(config)
        expansions = {}
        if config.custom_embeddings.enabled:
            if not family.supports_custom_embeddings:
                raise UserError("config key 'custom_embeddings.enabled': textual-inversion embeddings are not "
                                f"supported for {family.name} models; set it to false")
            from .models.embeddings import load_custom_embeddings

            expansions = load_custom_embeddings(paths.resolve(config.custom_embeddings.path),
                                                components.tokenizer, components.text_encoder)
            self.log(f"loaded custom embeddings: {', '.join(expansions)}")
        attention = prepare_models(family, components, config, plan, device)
        return components, expansions, attention

    def _total_steps(self, batches_per_epoch: int) -> int:
        trainer = self.config.trainer
        steps_per_epoch = math.ceil(batches_per_epoch / trainer.accumulate_grad_batches)
        return min(s for s in (trainer.max_steps, trainer.max_epochs and trainer.max_epochs * steps_per_epoch)
                   if s is not None)

    def _setup(self, plan: RunPlan, topology: distributed.Topology, device: torch.device,
               cleanup: contextlib.ExitStack) -> Optional[StepContext]:
        """Run folder, class images, models, data and caches, optimizer, resumed state and loggers, in that
        order. None when a stop request came during class image generation."""
        config = self.config
        resume_from = self._open_run_dir(topology, cleanup)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        torch.manual_seed(config.seed)
        if config.prior_preservation.enabled:
            distributed.main_first(topology, self._generate_missing_class_images, then_others=False)
            if distributed.any_rank(topology, self.stop_requested, device):
                return None
        family = family_for(config)
        components, expansions, attention = self._load_models(family, plan, device)
        if plan.sharded:  # before the optimizer, which steps the shards
            sharding.shard(components.unet, device)
        objective = family.objective(config, components.noise_scheduler)  # a range past the schedule fails here
        data = prepare_data(config, components.tokenizer, config.seed, topology.rank, topology.world_size,
                            expansions, pin_memory=device.type == "cuda")
        compile_clock = self._compile(components, plan, data, cleanup) if config.compile else None
        # Built on every rank, so that a mistake in its settings stops them all alike; the main one validates.
        validation = build_validation_set(config, components.tokenizer, components.noise_scheduler, data.held_out,
                                          data.bucket_sizes, expansions)
        self._log_buckets(data)
        batches_per_epoch = len(data.sampler)
        if batches_per_epoch == 0:
            raise UserError(f"no batch can be formed: every bucket holds fewer images than the "
                            f"{topology.world_size} processes; add images or train on fewer devices")
        total_steps = self._total_steps(batches_per_epoch)
        effective_batch = config.batch_size * config.trainer.accumulate_grad_batches * topology.world_size
        groups = parameter_groups(components, plan, config, scaled_lr(config.optimizer, effective_batch))
        optimizer = build_optimizer(config, plan, groups, config.seed)
        params = [p for group in groups for p in group["params"]]
        # The forward passes go through the DDP wrappers so that backward averages gradients over ranks (a
        # sharded denoiser averages its own).
        models = StepModels(
            family=family,
            unet=components.unet if plan.sharded else distributed.wrap(components.unet, topology, device),
            text_encoder=(distributed.wrap(components.text_encoder, topology, device) if plan.train_text_encoder
                          else components.text_encoder),
            vae=components.vae, objective=objective)
        self._models = models
        context = StepContext(
            components=components, plan=plan, device=device, topology=topology, data=data, models=models,
            params=params, optimizer=optimizer, lr_scheduler=build_schedule(config, optimizer, total_steps),
            scaler=torch.amp.GradScaler(device.type, enabled=plan.grad_scaler), text_cache=None,
            ema=None, prompt_encoder=PromptEncoder(family, components.tokenizer, components.text_encoder,
                                                   config.clip_stop_at_layer, expansions),
            batches_per_epoch=batches_per_epoch, total_steps=total_steps,
            compile_clock=compile_clock)
        self.state = self._restore(context, resume_from)
        self._start_caches(context)
        train_mode(optimizer)  # after the restore: checkpoints hold a schedule-free optimizer's evaluation point
        if topology.is_main:
            from .loggers import ExternalLoggers, MetricsLog

            context.metrics = MetricsLog(RunDir(self.run_dir).metrics,
                                         self.state.step if resume_from is not None else None)
            context.external = ExternalLoggers(config, self.run_dir, to_dict(config))
            # closed however the run ends, so W&B and TensorBoard keep what was logged
            cleanup.callback(context.metrics.close)
            cleanup.callback(context.external.close)
        if topology.is_main or plan.sharded:  # a sharded denoiser runs on every process at once
            context.validation = validation
        if plan.sharded:
            shard_bytes = sharding.local_bytes(components.unet)
            self.log(f"fsdp: this process holds {shard_bytes / 2**20:.3f} MiB of the denoiser's trained weights")
        self.emit(events.Started(run_dir=str(self.run_dir), total_steps=total_steps, start_step=self.state.step))
        repeated = f" ({len(data.dataset)} samples per epoch with repeats)" if len(data.dataset) != data.images else ""
        held = f"; {len(validation)} validation images" if validation is not None else ""
        self.log(f"{data.images} training images{repeated}, {len(data.skipped)} skipped{held}; {batches_per_epoch} "
                 f"batches per epoch; {total_steps} steps; device {device}; attention {attention}")
        return context

    def _compile(self, components, plan: RunPlan, data: PreparedData, cleanup: contextlib.ExitStack):
        """`compile`: the denoiser's repeated blocks compiled and, where the step encodes its images, the VAE's
        encoder (each on first use, once per size); and the clock of the seconds spent compiling. Dynamo's
        compiled code is let go when the run ends."""
        from . import regional_compile

        # blocks: training and validation (gradients off: graphs of their own) at each bucket's size, samples at
        # each prompt's; the encoder: images and control images at each bucket's size
        buckets = len(data.bucket_sizes)
        block_sizes = 2 * buckets + len(self.config.sampling.concepts)
        regional_compile.allow_graphs(regional_compile.SHAPES_PER_SIZE * block_sizes + 2 * buckets)
        regional_compile.compile_blocks(components.unet)
        cleanup.callback(torch._dynamo.reset)
        encoder = not plan.cache_latents and regional_compile.compile_encoder(components.vae)
        self.log(f"compile: {len(regional_compile.compiled_blocks(components.unet))} repeated blocks of the "
                 f"denoiser{' and the VAE encoder' if encoder else ''} compile on the first step of each size; "
                 f"kernels cached in {regional_compile.inductor_cache()}")
        return cleanup.enter_context(regional_compile.CompileClock())

    def _start_caches(self, context: StepContext) -> None:
        """Build the caches now or, with cache.fill: first_epoch and the first epoch still to finish, let its
        steps write them."""
        from .data.cache import explain_uncached

        plan = context.plan
        if plan.fill_first_epoch and self.state.epoch == 0 and (plan.cache_latents or plan.cache_text):
            from .data.cache_fill import FirstEpochFill

            explain_uncached(self.config, plan, self.log)
            context.fill = FirstEpochFill.for_run(self.config, plan, context.models.family, context.components,
                                                  lambda message: self.log(message, "warning"))
            self.log("the caches are written by the first epoch's steps and read from the second epoch on")
        else:
            self._attach_caches(context, explain=True)

    def _attach_caches(self, context: StepContext, explain: bool) -> None:
        from .data.cache import attach_caches

        # The main process fills the caches; the other ranks then find them full.
        context.text_cache = distributed.main_first(context.topology, lambda: attach_caches(
            self.config, context.plan, context.models.family, context.components, context.data.dataset,
            context.device, self.log, explain))

    def _finish_fill(self, context: StepContext) -> None:
        """After the first epoch: complete the caches it wrote and read them from now on."""
        fill, context.fill = context.fill, None
        fill.flush()
        # Every rank's shards are on disk before the main process looks for what is missing.
        if distributed.any_rank(context.topology, fill.failed, context.device):
            return  # the warning is out; the run goes on uncached
        try:
            self._attach_caches(context, explain=False)
        except Exception as error:  # a full disk, say: the caches only save time, the run goes on without them
            context.data.dataset.latents, context.text_cache = None, None
            self.log(f"the caches could not be completed ({error.__class__.__name__}: {error}); training goes on "
                     "without them", "warning")

    def _log_buckets(self, data: PreparedData) -> None:
        if self.config.aspect_ratio_bucket.debug:
            for bucket, (width, height) in enumerate(data.bucket_sizes):
                count = data.dataset.instance_buckets.count(bucket)
                if count:
                    self.log(f"bucket {width}x{height}: {count} images")

    def _restore(self, context: StepContext, resume_from: Optional[Path]) -> checkpoints.TrainState:
        """Weights, EMA, optimizer, schedule, scaler, RNG and data position of the checkpoint resumed from;
        a fresh state otherwise."""
        from .ema import EMA_FOLDER, create_ema, load_ema

        config, unet = self.config, context.components.unet
        if resume_from is not None:
            for name, model in trained_parts(context.components, context.plan).items():
                if context.plan.sharded:
                    sharding.load_weights(model, checkpoints.read_model_weights(resume_from, name))
                elif context.plan.adapter != "full":
                    load_adapter_folder(model, resume_from / name, "--resume")
                else:
                    checkpoints.load_model_weights(model, resume_from, name)
        elif config.network.init_from:
            # training goes on from an existing adapter file
            kohya.from_kohya(kohya.read_file(config.network.init_from, "network.init_from"),
                             trained_parts(context.components, context.plan), config, "network.init_from")
        # Only the main process samples and saves, so only it keeps the average.
        if config.ema.enabled and context.topology.is_main:
            if resume_from is not None and (resume_from / EMA_FOLDER).is_dir():
                context.ema = load_ema(resume_from, config.ema, context.device, unet)
            else:
                if resume_from is not None:
                    self.log(f"{resume_from.name} has no EMA weights: the average starts from the resumed weights",
                             "warning")
                context.ema = create_ema(unet, config.ema)
        if resume_from is None:
            return checkpoints.TrainState()
        saved = checkpoints.load_state(resume_from)
        # The rates the config sets, which loading the saved state replaces with the saved ones
        target = getattr(context.optimizer, "proxy", context.optimizer)
        rates = [group["initial_lr"] for group in target.param_groups]
        swap = getattr(unet, "block_swap", None)
        if context.plan.sharded:
            sharding.load_optimizer_state(unet, context.optimizer, saved["optimizer"])
        else:
            with swap.trained_seen_on_device() if swap is not None else contextlib.nullcontext():
                context.optimizer.load_state_dict(saved["optimizer"])
        state = checkpoints.TrainState.from_dict(saved)
        if self.resume_changes:
            # A resume that changed the config: the rate, schedule and step count it sets apply from here.
            for group, rate in zip(target.param_groups, rates):
                group["lr"] = group["initial_lr"] = rate
            context.lr_scheduler = schedule_at(config, context.optimizer, context.total_steps, state.step)
        else:
            context.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        context.scaler.load_state_dict(saved["scaler"])
        checkpoints.restore_rng_states(saved["rng"], context.device)
        self.log(f"resuming {self.run_dir} from {resume_from.name} (step {state.step})")
        return state

    # -- the step loop ------------------------------------------------------------------------------------
    def _train_loop(self, context: StepContext) -> events.Event:
        config, state, topology, device = self.config, self.state, context.topology, context.device
        steps = optimizer_steps(context, state, config.trainer.accumulate_grad_batches)
        clock = StepClock()
        stopped = False
        last = state.step >= context.total_steps  # resumed from the final checkpoint: nothing left to do
        if last:
            self.log(f"the run has already trained its {context.total_steps} steps: nothing to train; raise "
                     f"trainer.max_steps (--set trainer.max_steps=N) to train it further")
        while not last:
            micro_batches = next(steps)
            losses, parts = [], None
            for index, batch in enumerate(micro_batches):
                last_of_group = index == len(micro_batches) - 1
                # Ranks exchange gradients once per group, on the micro-batch that completes it. DDP decides
                # at the forward pass whether the backward pass exchanges, so both run in no_sync before it.
                with contextlib.nullcontext() if last_of_group else self._no_sync():
                    loss, parts = compute_loss(config, context.models, batch, device, context.plan.autocast,
                                               context.text_cache, fill=context.fill)
                    # CPU–GPU sync: every rank learns whether any loss is non-finite before stepping on it.
                    finite = bool(torch.isfinite(loss))
                    if distributed.any_rank(topology, not finite, device):
                        value = "non-finite on another process" if finite else loss.item()
                        raise UserError(f"the loss became {value} at step {state.step + 1}; stopping. Lower "
                                        "optimizer.params.lr or use bf16/fp32 precision")
                    backward(loss, context.scaler, context.optimizer, len(micro_batches), last_of_group)
                losses.append(loss.item())  # CPU–GPU sync
            if not optimizer_step(context.optimizer, context.scaler, context.params,
                                  config.trainer.gradient_clip_val):
                state.overflow_steps += 1
            if context.ema is not None:
                ema_step(context.ema, averaged_parameters(context.components.unet), config.ema.on_cpu)
            lr = context.optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves
            context.lr_scheduler.step()
            context.optimizer.zero_grad(set_to_none=True)
            epoch = state.epoch
            epoch_ended = state.advance(len(micro_batches), context.batches_per_epoch)
            if epoch_ended and context.fill is not None:
                self._finish_fill(context)
            # a step that compiled counts its compile time apart: the step time is that of the compiled steps
            compile_s = context.compile_clock.take() if context.compile_clock is not None else 0.0
            it_per_s = clock.tick(compile_s)
            if compile_s:
                self.log(f"compile: {compile_s:.1f} s compiling during step {state.step}")
            validation = self._validate(context)  # before the step's record, which carries its result
            self._report_step(context, epoch, sum(losses) / len(losses), lr, parts, it_per_s, validation,
                              compile_s)
            stopped = distributed.any_rank(topology, self.stop_requested, device)
            last = stopped or state.step >= context.total_steps
            self._run_due(context, epoch_ended, last, stopped)
            clock.restart()  # sampling and saving are not training time
            if context.compile_clock is not None:
                context.compile_clock.take()  # nor is compiling for them
        if context.fill is not None:
            context.fill.flush()  # a run stopped within its first epoch keeps what it encoded
        summary = {"steps": state.step, "images": context.data.images, "skipped": len(context.data.skipped),
                   "skipped_reasons": [{"path": p, "reason": r} for p, r in context.data.skipped],
                   "failed_sample_rounds": self.failed_sample_rounds}
        return events.Finished(run_dir=str(self.run_dir), step=state.step, stopped=stopped, summary=summary)

    def _report_step(self, context: StepContext, epoch: int, loss: float, lr: float, parts: LossParts,
                     it_per_s: float, validation: dict, compile_s: float) -> None:
        state, total = self.state, context.total_steps
        record = {"step": state.step, "epoch": epoch,
                  "loss": distributed.mean_over_ranks(context.topology, loss, context.device),
                  "lr": lr, "width": parts.width, "height": parts.height}
        if compile_s:
            record["compile_s"] = compile_s
        if context.plan.grad_scaler:
            record["overflow_steps"] = state.overflow_steps
        if parts.prior_loss is not None:  # CPU–GPU sync
            record["instance_loss"], record["prior_loss"] = parts.instance_loss.item(), parts.prior_loss.item()
        record.update(validation)
        if context.metrics is not None and (state.step % self.config.trainer.log_every_n_steps == 0
                                            or state.step == total or validation):
            context.metrics.write(record)
            self._side_task("logging", context.external.log, record)
        self.emit(events.Step(step=state.step, epoch=record["epoch"], loss=record["loss"], lr=record["lr"],
                              it_per_s=it_per_s, total_steps=total,
                              eta_s=(total - state.step) / it_per_s if it_per_s else 0.0))

    def _validate(self, context: StepContext) -> dict:
        """val_loss and its per-timestep values when a validation round is due (on the main process), else
        nothing. Like samples, validation is a side task: a failure is a warning and training goes on."""
        step, every = self.state.step, self.config.validation.every_n_steps
        if context.validation is None or not (step % every == 0 or step >= context.total_steps):
            return {}
        components = context.components
        # With both caches on, the VAE and text encoder wait off the device: put them back afterwards.
        resting = {model: next(model.parameters()).device for model in (components.vae, components.text_encoder)}
        try:
            for model in resting:
                model.to(context.device)
            # the plain modules: DDP wrappers would wait for the other ranks, which do not validate
            models = StepModels(family=context.models.family, unet=components.unet,
                                text_encoder=components.text_encoder, vae=components.vae,
                                objective=context.models.objective)
            with eval_weights(context.optimizer):
                per_timestep = validation_loss(self.config, models, context.validation, context.device,
                                               context.plan.autocast)
        except Exception as error:  # any failure of the side task; training goes on
            if isinstance(error, torch.OutOfMemoryError):
                release_memory()
            self.log(f"validation at step {step} failed and was skipped; training goes on: "
                     f"{error.__class__.__name__}: {error}", "warning")
            return {}
        finally:
            for model, home in resting.items():
                model.to(home)
        metrics = validation_metrics(per_timestep)
        self.emit(events.Validation(step=step, loss=metrics["val_loss"],
                                    per_timestep={str(t): value for t, value in per_timestep.items()}))
        return metrics

    def _run_due(self, context: StepContext, epoch_ended: bool, last: bool, stopped: bool) -> None:
        """Sampling and checkpoints, periodic or at the end of the run (last), decided in one place."""
        config, step = self.config, self.state.step
        reason = self._checkpoint_due(epoch_ended, last, stopped)
        if reason and context.fill is not None:
            # Every rank's cache holds what was encoded before the checkpoint, so a run resumed from it
            # encodes again exactly the samples it replays.
            context.fill.flush()
        sampling = config.sampling
        # a sharded denoiser renders on every process at once; the main process keeps the images
        samples = context.topology.is_main or context.plan.sharded
        if samples and sampling.concepts and sampling.interval_steps and not stopped and (
                step % sampling.interval_steps == 0 or last):
            self._sample(context)
        if reason:
            # Every rank moves to the weights the checkpoint holds and back, as a resume from it would, so that
            # a schedule-free optimizer's ranks go on from the same weights.
            with checkpoint_weights(context.optimizer):
                # a sharded denoiser's whole weights and optimizer state are gathered by every process at once
                gathered = self._gather(context) if context.plan.sharded else None
                if context.topology.is_main:
                    self._save(context, reason, gathered)

    def _checkpoint_due(self, epoch_ended: bool, last: bool, stopped: bool) -> Optional[str]:
        """Why a checkpoint is saved after this step, or None."""
        checkpoint = self.config.checkpoint
        every = checkpoint.every_n_train_steps
        # As in Lightning's ModelCheckpoint, every_n_train_steps replaces every_n_epochs when set.
        every_epochs = None if every else checkpoint.every_n_epochs
        if last:
            return ("stop" if stopped else "end") if not stopped or self._save_on_stop else None
        if every and self.state.step % every == 0:
            return "every_n_train_steps"
        if epoch_ended and every_epochs and self.state.epoch % every_epochs == 0:
            return "every_n_epochs"
        return None

    @staticmethod
    def _gather(context: StepContext) -> tuple[dict, dict]:
        """The sharded denoiser's whole weights and optimizer state, on the main process."""
        unet = context.components.unet
        return sharding.gathered_weights(unet), sharding.gathered_optimizer_state(unet, context.optimizer)

    def _save(self, context: StepContext, reason: str, gathered: Optional[tuple[dict, dict]]) -> None:
        """This step's checkpoint, unless one was saved at this step already; called at the weights that
        checkpoint_weights puts in place. `gathered`: a sharded denoiser's (weights, optimizer state)."""
        latest = checkpoints.latest_checkpoint(self.run_dir)
        if latest is not None and checkpoints.read_meta(latest)["step"] == self.state.step:
            return  # already saved at this step
        self._write_checkpoint(context, reason, gathered)

    def _write_checkpoint(self, context: StepContext, reason: str, gathered: Optional[tuple[dict, dict]]) -> None:
        from .ema import EMA_FOLDER

        components = context.components
        optimizer_state = gathered[1] if gathered else context.optimizer.state_dict()
        saved = {**self.state.to_dict(), "optimizer": optimizer_state,
                 "lr_scheduler": context.lr_scheduler.state_dict(), "scaler": context.scaler.state_dict(),
                 "rng": checkpoints.rng_states(context.device)}
        trained = trained_parts(components, context.plan)
        adapter = context.plan.adapter != "full"
        # an adapter run keeps only the adapter's weights, and writes the file the UIs load beside them
        models = {name: AdapterWeights(model) if adapter else model for name, model in trained.items()}
        if gathered:
            models["unet"] = sharding.GatheredModel(components.unet, gathered[0])
        if context.ema is not None:
            models[EMA_FOLDER] = context.ema
        meta = {"epoch": self.state.epoch, "base_model": components.model_path, "reason": reason,
                "trained": sorted(models), "prediction_type": components.noise_scheduler.config.get("prediction_type"),
                "network": context.plan.adapter, "family": context.models.family.name}
        step, epoch, images = self.state.step, self.state.epoch, len(context.data.dataset)

        def write_adapter_file(folder: Path) -> None:
            kohya.save(folder / kohya.ADAPTER_EXPORT, trained, self.config, step, epoch, images)

        path = checkpoints.save_checkpoint(self.run_dir, step, models, saved, meta, self.config.checkpoint.save_top_k,
                                           write_adapter_file if adapter else None)
        self.emit(events.CheckpointSaved(step=self.state.step, path=str(path)))

    def _sample(self, context: StepContext) -> None:
        """Render the sampling prompts. Samples are a side product: a failure is reported and counted, and
        training goes on."""
        from .ema import SwapInEma

        components, config, step = context.components, self.config, self.state.step
        # With both caches on, the VAE and text encoder wait off the device: put them back after sampling.
        resting = {model: next(model.parameters()).device for model in (components.vae, components.text_encoder)}
        try:
            pipeline = context.models.family.pipeline(components, components.unet, components.text_encoder,
                                                      context.device)
            with eval_weights(context.optimizer), SwapInEma(context.ema if config.ema.use_for_samples else None,
                                                            averaged_parameters(components.unet)), \
                    self._sample_folder(context, step) as folder:
                sample_paths = generate_samples(config, pipeline, context.prompt_encoder, folder,
                                                context.plan.autocast)
        except Exception as error:  # any failure of the side task; training goes on
            if isinstance(error, torch.OutOfMemoryError):
                release_memory()
            self.failed_sample_rounds += 1
            self.log(f"sampling at step {step} failed and was skipped; training goes on: "
                     f"{error.__class__.__name__}: {error}", "warning")
            return
        finally:
            for model, home in resting.items():
                model.to(home)
        if not context.topology.is_main:
            return
        self.emit(events.Sample(step=step, paths=sample_paths))
        self._side_task("sample upload", context.external.log_images, step, sample_paths)

    @contextlib.contextmanager
    def _sample_folder(self, context: StepContext, step: int):
        """Where this process's samples go: the run's samples folder, or, for the processes beside the main
        one that render with a sharded denoiser, a temporary folder removed afterwards."""
        if context.topology.is_main:
            yield RunDir(self.run_dir).samples(step)
            return
        with tempfile.TemporaryDirectory(prefix="scal-sdt-samples-") as folder:
            yield Path(folder)

    def _side_task(self, name: str, work: Callable, *args) -> None:
        """Logging to W&B/TensorBoard never ends a run: a failure is a warning."""
        try:
            work(*args)
        except Exception as error:  # an external service's failure of any kind
            self.log(f"{name} failed at step {self.state.step}: {error.__class__.__name__}: {error}", "warning")

    def _no_sync(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for model in (self._models.unet, self._models.text_encoder):
            if hasattr(model, "no_sync"):
                stack.enter_context(model.no_sync())
        return stack


def schedule_at(config: Config, optimizer, total_steps: int, step: int):
    """config's schedule for optimizer, advanced to `step` as if it had run from the start at its rates."""
    target = getattr(optimizer, "proxy", optimizer)
    # Replayed on a stand-in optimizer with the same rates: torch objects to a schedule that steps before its
    # optimizer has, and stepping the real one would move its state. Nothing has gradients, so nothing moves.
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": group["lr"]}
                                for group in target.param_groups])
    replay = build_schedule(config, stand_in, total_steps)
    for _ in range(step):
        stand_in.step()
        replay.step()
    schedule = build_schedule(config, optimizer, total_steps)
    schedule.load_state_dict(replay.state_dict())
    for group, replayed in zip(target.param_groups, stand_in.param_groups):
        group["lr"] = replayed["lr"]
    return schedule


class StepClock:
    """Optimizer steps per second over the last 20 steps."""

    def __init__(self):
        self.times: list[float] = []
        self.last = time.perf_counter()

    def tick(self, excluded: float = 0.0) -> float:
        """Steps per second, this step's time less `excluded` seconds (spent compiling)."""
        now = time.perf_counter()
        self.times.append(max(now - self.last - excluded, 0.0))
        self.last = now
        recent = self.times[-20:]
        return len(recent) / sum(recent) if sum(recent) > 0 else 0.0

    def restart(self) -> None:
        self.last = time.perf_counter()
