"""What the app's buttons do, without gradio: each action returns the message the page shows.

Engine errors become messages here, so a bad config or a failing engine never takes the server down.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from engine import config as schema
from engine.errors import UserError

from . import configs, job_kinds
from .allowed import PathPolicy
from .jobs import CLASSGEN, TRAIN, JobBusy, JobManager
from .run_queue import FAILED, QUEUED, RUNNING, QueueError, RunQueue


class Actions:
    def __init__(self, manager: JobManager, run_queue: Optional[RunQueue] = None,
                 policy: PathPolicy = PathPolicy.local()):
        """run_queue: the queue that "Add to queue" adds to (the page's); without one those actions are refused.
        policy: where the page may read and write."""
        self.manager = manager
        self.queue = run_queue
        self.policy = policy

    def _start(self, kind: str, build: Callable, label: str) -> str:
        try:
            self.manager.start(kind, build, label)
        except JobBusy as error:
            return f"Refused: {error} *Add to queue* runs it after."
        except UserError as error:
            return f"Not started: {error}"
        except Exception as error:  # an engine fault while building the job: shown, the server keeps serving
            return f"Not started: {error.__class__.__name__}: {error}"
        return f"Started {label}."

    def _config(self, yaml_text: str) -> schema.Config:
        """The config of the page's YAML; raises UserError for a bad one or one naming a path the app may not use."""
        config = job_kinds.load_config(yaml_text)
        self.policy.check_config(config)
        return config

    def start_training(self, yaml_text: str) -> str:
        try:
            config = self._config(yaml_text)
        except UserError as error:
            return f"Not started: {error}"
        return self._start(TRAIN, job_kinds.train_builder(config), f"training ({config.project})")

    def resume_training(self, run_dir: str) -> str:
        if not run_dir:
            return "Error: Choose a run to resume."
        try:
            self.policy.check("the run to resume", run_dir)
        except UserError as error:
            return f"Not started: {error}"
        return self._start(TRAIN, job_kinds.resume_builder(run_dir, self.policy), f"resuming {Path(run_dir).name}")

    def generate_class_images(self, yaml_text: str) -> str:
        try:
            config = job_kinds.class_generation_config(yaml_text)
        except schema.ConfigError as error:
            return f"Not started: {error}"
        except UserError as error:
            return f"Error: {error}"
        try:
            self.policy.check_config(config)
        except UserError as error:
            return f"Not started: {error}"
        return self._start(CLASSGEN, job_kinds.classgen_builder(config), "class image generation")

    # -- the run queue ----------------------------------------------------------------------------------
    def _enqueue(self, kind: str, spec: dict, label: str) -> str:
        """Add to the queue; the message says whether it started at once, could not start, or waits."""
        if self.queue is None:
            return "Error: this app has no run queue."
        try:
            entry = self.queue.add(kind, spec, label)
        except (QueueError, OSError) as error:
            return f"Not queued: {error}"
        if entry.state == RUNNING:
            return f"Started {label} (nothing else was running)."
        if entry.state == FAILED:
            return f"Not started: {entry.error}"
        position = [e.id for e in self.queue.entries() if e.state == QUEUED].index(entry.id) + 1
        return f"Queued {label} at position {position}: it starts when the jobs before it have ended."

    def queue_training(self, yaml_text: str) -> str:
        try:
            config = self._config(yaml_text)
        except UserError as error:
            return f"Not queued: {error}"
        return self._enqueue("train", {"yaml": yaml_text}, f"training ({config.project})")

    def queue_resume(self, run_dir: str) -> str:
        if not run_dir:
            return "Error: Choose a run to resume."
        try:
            self.policy.check("the run to resume", run_dir)
        except UserError as error:
            return f"Not queued: {error}"
        return self._enqueue("resume", {"run_dir": run_dir}, f"resuming {Path(run_dir).name}")

    def queue_class_images(self, yaml_text: str) -> str:
        try:
            self.policy.check_config(job_kinds.class_generation_config(yaml_text))
        except schema.ConfigError as error:
            return f"Not queued: {error}"
        except UserError as error:
            return f"Error: {error}"
        return self._enqueue("classgen", {"yaml": yaml_text}, "class image generation")

    def queue_conversion(self, source: str, out: str, options: dict) -> str:
        if not source or not out:
            return "Error: Choose a checkpoint (or a model path) and an output path."
        refusal = self._conversion_refusal(source, out)
        if refusal:
            return refusal
        return self._enqueue("convert", {"source": source, "out": out, "options": options},
                             f"converting {Path(source).name}")

    def queue_captioning(self, folder: str, model: str, prefix: str = "", overwrite: bool = False) -> str:
        """Caption the images of a dataset folder with a captioner (a folder or a Hub id)."""
        if not (model or "").strip():
            return "Error: Name a captioner: a model folder or a Hugging Face Hub id."
        try:
            self.policy.check("Captioner", model.strip(), model=True)
            self.policy.check("the dataset", folder)
            options = job_kinds.caption_options({"model": model.strip(), "path": folder, "prefix": prefix,
                                                 "overwrite": bool(overwrite)})
        except UserError as error:
            return f"Not queued: {error}"
        return self._enqueue("caption", {"options": dataclasses.asdict(options)},
                             f"captioning {Path(folder).name}")

    def queue_list(self) -> list[dict]:
        """The queue for API clients, in the order the Queue tab lists it (without what rebuilds each job)."""
        if self.queue is None:
            return []
        return [{key: value for key, value in dataclasses.asdict(entry).items() if key != "spec"}
                for entry in self.queue.entries()]

    def cancel_entry(self, entry_id: str) -> str:
        return self._on_entry(entry_id, lambda queue: queue.cancel(entry_id))

    def move_up(self, entry_id: str) -> str:
        return self._on_entry(entry_id, lambda queue: queue.move_up(entry_id))

    def _on_entry(self, entry_id: str, operation: Callable) -> str:
        if self.queue is None:
            return "Error: this app has no run queue."
        if not entry_id:
            return "Error: Choose an entry of the queue."
        try:
            return operation(self.queue)
        except QueueError as error:
            return f"Error: {error}"

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

    def _conversion_refusal(self, source: str, out: str) -> Optional[str]:
        """The message refusing a conversion from or to a path the app may not use; None when both may be used."""
        try:
            self.policy.check("Convert source", source)
            self.policy.check("Convert output", out)
        except UserError as error:
            return f"Error: {error}"
        return None

    def convert(self, source: str, out: str, options: dict,
                on_event: Optional[Callable] = None) -> str:
        if not source or not out:
            return "Error: Choose a checkpoint (or a model path) and an output path."
        refusal = self._conversion_refusal(source, out)
        if refusal:
            return refusal
        from engine.models import convert  # imports torch: loaded on first use, not with the page

        try:
            path = convert.convert_checkpoint(source, out, on_event=on_event, **options)
        except UserError as error:
            return f"Error: {error}"
        except Exception as error:  # an engine fault: shown, the server keeps serving
            return f"Error: {error.__class__.__name__}: {error}"
        return f"Wrote `{path}` ({convert.format_size(path.stat().st_size)})"
