"""The whole page: the tabs over one config, the run queue's tab, and a timer that shows the server's job as
it runs."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from . import (charts, configs, fields, job_kinds, live, presets, tab_classgen, tab_convert, tab_dataset, tab_queue,
               tab_train)
from .actions import Actions
from .allowed import PathPolicy
from .context import PageContext
from .datasets import MAX_UPLOAD_BYTES
from .jobs import CAPTION, CLASSGEN, TRAIN, JobManager
from .run_queue import RunQueue

POLL_SECONDS = 1.0
TITLE = "SCAL-SDT"

_served: set = set()


def serve_files(paths: list[str]) -> None:
    """Let the page show these images that a job wrote, and no other file beside them: a folder would
    open everything under it (the output folder is whatever a config says)."""
    new = [path for path in paths if path not in _served]
    if new:
        _served.update(new)
        gr.set_static_paths(new)


def build_page(manager: Optional[JobManager] = None, output_dir: Optional[str] = None,
               warning: Optional[str] = None, data_dir: Optional[str] = None,
               policy: PathPolicy = PathPolicy.local(), max_upload_bytes: int = MAX_UPLOAD_BYTES,
               run_queue: Optional[RunQueue] = None) -> gr.Blocks:
    """The app's page; a warning, when given, shows above the tabs. data_dir: where uploaded datasets go;
    policy: where the page may read and write; max_upload_bytes: see PageContext; run_queue: the manager's queue
    (without one, a queue kept in memory only)."""
    manager = manager or JobManager()
    run_queue = run_queue or RunQueue(manager, None, job_kinds.KINDS)
    preset_list = presets.all_presets()
    selected = presets.default_preset(presets.list_presets(), presets.has_cuda_gpu())
    ctx = PageContext(manager=manager, actions=Actions(manager, run_queue, policy), output_dir=output_dir,
                      raw=presets.load_preset(selected, output_dir), data_dir=data_dir, policy=policy,
                      max_upload_bytes=max_upload_bytes)
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## {TITLE} — Stable Diffusion, Flux.1 and Z-Image fine-tuning")
        if warning:
            gr.Markdown(f"**Warning:** {warning}", elem_id="page-warning")
        with gr.Tabs(selected="train"):
            with gr.Tab("Dataset", id="dataset"):
                dataset = tab_dataset.build(ctx)
            with gr.Tab("Class images", id="class-images"):
                classgen = tab_classgen.build(ctx)
            with gr.Tab("Train", id="train"):
                train = tab_train.build(ctx, preset_list, selected)
            with gr.Tab("Convert", id="convert"):
                convert = tab_convert.build(ctx)
            with gr.Tab("Queue", id="queue"):
                queued = tab_queue.build(ctx)
        _wire_config(ctx)
        tab_dataset.wire(ctx, dataset)
        tab_classgen.wire(ctx, classgen)
        tab_train.wire(ctx, train, page)
        tab_convert.wire(ctx, convert, page)
        tab_queue.wire(ctx, queued)
        _wire_live(ctx, page, train, classgen, queued, dataset)
    return page


def _wire_config(ctx: PageContext) -> None:
    """Keep the form and the YAML editor showing the same config, whichever the user edits."""
    def form_edited(yaml_text: str, *values):
        merged, message = configs.merge_form(yaml_text, list(values), ctx.policy)
        return (gr.skip() if merged is None else merged), message

    gr.on([c.input for c in ctx.inputs], form_edited, [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check],
          trigger_mode="always_last", api_visibility="private")

    def yaml_edited(yaml_text: str):
        values, message = configs.form_from_yaml(yaml_text, ctx.policy)
        return [message, *(values if values is not None else [gr.skip()] * len(fields.ALL))]

    ctx.yaml.input(yaml_edited, ctx.yaml, [ctx.check, *ctx.inputs], trigger_mode="always_last",
                   api_visibility="private")


def _wire_live(ctx: PageContext, page: gr.Blocks, train, classgen, queued, dataset) -> None:
    """One poll redraws the jobs' live views and the queue: one request a second per browser tab."""
    manager = ctx.manager
    train_outputs = [train.status, train.progress, train.loss, train.lr, train.gallery, train.log]
    class_outputs = [classgen.status, classgen.progress, classgen.gallery, classgen.log]
    caption_outputs = [dataset.caption_progress]

    def render_train(history):
        points = history.points if history else []
        serve_files([path for _, path in history.samples] if history else [])
        return [live.status_line(history, tab_train.IDLE), live.train_progress(history),
                charts.loss_frame(points, history.validation if history else ()), charts.lr_frame(points),
                live.sample_gallery(history), live.log_text(history)]

    def render_classgen(history):
        serve_files(history.images if history else [])
        return [live.status_line(history, ""), live.image_progress(history, "nothing generated yet"),
                list(history.images) if history else [], live.log_text(history)]

    def render_captioning(history):
        return [live.image_progress(history, "no captioning yet")]

    def refresh(seen: Optional[dict], output_dir: str, train_message: str, class_message: str,
                caption_message: str, queue_entry: Optional[str]):
        # seen: what this browser tab last rendered, so an unchanged job sends nothing.
        seen = dict(seen or {})
        updates, messages = [], []
        for kind, render, count, message in ((TRAIN, render_train, len(train_outputs), train_message),
                                             (CLASSGEN, render_classgen, len(class_outputs), class_message),
                                             (CAPTION, render_captioning, len(caption_outputs), caption_message)):
            version = manager.version(kind)
            if kind in seen and seen[kind] == version:
                updates += [gr.skip()] * count
                history = manager.snapshot(kind) if (message or "").startswith(live.PENDING_PREFIXES) else None
            else:
                history = manager.snapshot(kind)
                updates += render(history)
                seen[kind] = history.version if history else -1
            # Checked on every poll rather than when the history changes: the "Started" of a job that failed
            # at once can reach the page after the poll that drew the failure.
            settled = live.settled_message(message, history)
            messages.append(gr.skip() if settled is None else settled)
        active = manager.active_run_dir()
        runs_for = [manager.state(TRAIN), active, output_dir]
        if seen.get("runs_for") != runs_for:
            # A run that started or ended (or another output folder) changes what can be resumed.
            seen["runs_for"] = runs_for
            choices = tab_train.resume_choices(output_dir, active, ctx.policy)
            updates.append(gr.update(choices=choices, value=choices[0][1] if choices else None))
        else:
            updates.append(gr.skip())
        queue_updates, seen["queue"] = tab_queue.render(ctx.actions.queue, seen.get("queue"), queue_entry)
        return [*updates, *queue_updates, *messages, seen]

    seen = gr.State(None)
    outputs = [*train_outputs, *class_outputs, *caption_outputs, train.resume_run, queued.note, queued.table,
               queued.entry, train.message, classgen.message, dataset.caption_status, seen]
    inputs = [seen, ctx.form["output_dir"], train.message, classgen.message, dataset.caption_status, queued.entry]
    page.load(refresh, inputs, outputs, api_visibility="private", show_progress="hidden")
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(refresh, inputs, outputs, api_visibility="private", show_progress="hidden")
    gr.api(ctx.actions.status, api_name="job_status")
