"""What the app's buttons do, without gradio: each action returns the message the page shows.

Engine errors become messages here, so a bad config or a failing engine never takes the server down.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from engine import config as schema
from engine.errors import UserError

from . import configs, multi_device
from .allowed import PathPolicy
from .jobs import CLASSGEN, TRAIN, JobBusy, JobManager


def _train_builder(config: schema.Config) -> Callable:
    def build(events):
        from engine import distributed

        processes = distributed.process_count(config.trainer.devices)
        if processes > 1:
            return multi_device.torchrun_training(events, processes, config)
        from engine.train import Trainer

        return Trainer(config, events)

    return build


def _resume_builder(run_dir: str, policy: PathPolicy) -> Callable:
    def build(events):
        from engine import distributed
        from engine.train import Trainer

        trainer = Trainer.for_resume(run_dir, events)  # checks that run_dir is a run folder
        policy.check_config(trainer.config)  # the run may have been started by an app that allowed more
        processes = distributed.process_count(trainer.config.trainer.devices)
        if processes > 1:
            return multi_device.torchrun_training(events, processes, trainer.config, resume_dir=run_dir)
        return trainer

    return build


def _classgen_builder(config: schema.Config) -> Callable:
    def build(events):
        from engine.classgen import ClassGenJob

        return ClassGenJob(config, events)

    return build


class Actions:
    def __init__(self, manager: JobManager, policy: PathPolicy = PathPolicy.local()):
        self.manager = manager
        self.policy = policy  # where the page may read and write

    def _start(self, kind: str, build: Callable, label: str) -> str:
        try:
            self.manager.start(kind, build, label)
        except JobBusy as error:
            return f"Refused: {error}"
        except UserError as error:
            return f"Not started: {error}"
        except Exception as error:  # an engine fault while building the job: shown, the server keeps serving
            return f"Not started: {error.__class__.__name__}: {error}"
        return f"Started {label}."

    def _config(self, yaml_text: str) -> schema.Config:
        """The config of the page's YAML; raises UserError for a bad one or one naming a path the app may not use."""
        config, _ = configs.load(configs.parse_yaml(yaml_text))
        self.policy.check_config(config)
        return config

    def start_training(self, yaml_text: str) -> str:
        try:
            config = self._config(yaml_text)
        except UserError as error:
            return f"Not started: {error}"
        return self._start(TRAIN, _train_builder(config), f"training ({config.project})")

    def resume_training(self, run_dir: str) -> str:
        if not run_dir:
            return "Error: Choose a run to resume."
        try:
            self.policy.check("the run to resume", run_dir)
        except UserError as error:
            return f"Not started: {error}"
        return self._start(TRAIN, _resume_builder(run_dir, self.policy), f"resuming {Path(run_dir).name}")

    def generate_class_images(self, yaml_text: str) -> str:
        try:
            config = self._config(yaml_text)
        except UserError as error:
            return f"Not started: {error}"
        concepts = config.data.concepts
        if not concepts or concepts[0].class_set is None or not concepts[0].class_set.path:
            return "Error: Set a class folder on the Dataset tab first."
        # Generate is an explicit request: it applies to the first concept whatever the config says.
        concepts[0].class_set.auto_generate.enabled = True
        return self._start(CLASSGEN, _classgen_builder(config), "class image generation")

    def stop(self) -> str:
        return self.manager.stop()

    def status(self) -> dict:
        """The current job for API clients: kind, state, step, loss and where its files are."""
        history = self.manager.snapshot()
        if history is None:
            return {"kind": None, "state": "idle"}
        last = history.points[-1] if history.points else {}
        return {"kind": history.kind, "state": history.state, "step": history.step,
                "total_steps": history.total_steps, "epoch": history.epoch, "loss": last.get("loss"),
                "lr": last.get("lr"), "it_per_s": history.it_per_s, "eta_s": history.eta_s,
                "done": history.done, "total": history.total, "run_dir": history.run_dir,
                "samples": [path for _, path in history.samples], "images": list(history.images),
                "error": history.error}

    def estimate_vram(self, yaml_text: str) -> str:
        from engine import vram  # imports torch: loaded on first use, not with the page

        try:
            config = self._config(yaml_text)
            estimate = vram.estimate(config)
            # what the estimate assumed, from the same run plan the trainer follows
            step = vram.describe(config, vram.estimate_plan(config), vram.step_shape(config))
        except UserError as error:
            return f"Error: {error}"
        parts = [f"{name.replace('_', ' ')} {value:.2f}" for name, value in dataclasses.asdict(estimate).items()
                 if name not in ("peak", "ram")]
        ram = estimate.ram
        return (f"Estimated peak GPU memory: **{estimate.peak:.2f} GiB** ({', '.join(parts)} GiB); system RAM: "
                f"**{ram.peak:.2f} GiB** at its peak ({ram.loading:.2f} GiB while loading the model, "
                f"{ram.training:.2f} GiB while training). Step: {step}")

    def fit_memory(self, yaml_text: str, vram_gib: Optional[float],
                   ram_gib: Optional[float]) -> tuple[str, Optional[str]]:
        """(one-line summary, the page's YAML with the memory plan's settings written in; None when the config is
        refused or nothing fits)."""
        from engine import memory_plan  # imports torch: loaded on first use, not with the page

        try:
            config = self._config(yaml_text)
            limits = memory_plan.check_limit(vram_gib, "GPU memory"), memory_plan.check_limit(ram_gib, "System RAM")
            plan = memory_plan.plan_memory(config, *limits)
        except UserError as error:
            return f"Error: {error}", None
        if not plan.fits:
            return f"Nothing fits: {plan.reason}", None
        changed = memory_plan.format_settings(plan.settings) or "no change needed"
        notes = "".join(f" Note: {note}." for note in plan.notes)
        return (f"Fits: estimated GPU peak **{plan.estimate.peak:.2f} GiB**, system RAM **{plan.estimate.ram.peak:.2f}"
                f" GiB** with {changed}.{notes}",
                configs.to_yaml(memory_plan.with_settings(configs.parse_yaml(yaml_text), plan.settings)))

    def convert(self, source: str, out: str, options: dict,
                on_event: Optional[Callable] = None) -> str:
        if not source or not out:
            return "Error: Choose a checkpoint (or a model path) and an output path."
        try:
            self.policy.check("Convert source", source)
            self.policy.check("Convert output", out)
        except UserError as error:
            return f"Error: {error}"
        from engine.models import convert  # imports torch: loaded on first use, not with the page

        try:
            path = convert.convert_checkpoint(source, out, on_event=on_event, **options)
        except UserError as error:
            return f"Error: {error}"
        except Exception as error:  # an engine fault: shown, the server keeps serving
            return f"Error: {error.__class__.__name__}: {error}"
        return f"Wrote `{path}` ({convert.format_size(path.stat().st_size)})"
