"""The Class images tab: generate the regularization images for prior preservation."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import gradio as gr

from . import fields
from .context import PageContext, sync_form


def build(ctx: PageContext) -> SimpleNamespace:
    ui = SimpleNamespace()
    gr.Markdown("Images are written to the class folder set on the Dataset tab; those already there count.")
    ctx.add_fields(fields.CLASS_IMAGES, per_row=5)
    with gr.Row():
        ui.generate = gr.Button("Generate", variant="primary", elem_id="generate-button")
        ui.enqueue = gr.Button("Add to queue", elem_id="generate-queue-button")
        ui.stop = gr.Button("Stop", variant="stop", elem_id="generate-stop-button")
    ui.message = gr.Markdown(elem_id="classgen-message")
    ui.status = gr.Markdown(elem_id="classgen-status")
    ui.progress = gr.HTML(elem_id="classgen-progress")
    ui.gallery = gr.Gallery(label="Generated", columns=8, height=300, object_fit="contain",
                            elem_id="class-gallery")
    ui.log = gr.Textbox(label="Log", lines=6, max_lines=6, autoscroll=True, interactive=False,
                        elem_id="classgen-log")
    return ui


def wire(ctx: PageContext, ui: SimpleNamespace) -> None:
    (ui.generate.click(functools.partial(sync_form, policy=ctx.policy), [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(ctx.actions.generate_class_images, ctx.yaml, ui.message, api_name="generate_class_images"))
    (ui.enqueue.click(functools.partial(sync_form, policy=ctx.policy), [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(ctx.actions.queue_class_images, ctx.yaml, ui.message, api_name="queue_class_images"))
    ui.stop.click(ctx.actions.stop, None, ui.message, api_visibility="private")
