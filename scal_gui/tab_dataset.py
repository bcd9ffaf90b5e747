"""The Dataset tab: folders, resolution and buckets; what training will make of the images."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from . import bucket_view, configs, fields
from .context import PageContext


@functools.cache
def thumbnails_dir() -> Path:
    """The app process's one folder of thumbnails, removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="scal-sdt-thumbs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def cleared_thumbnails_dir() -> Path:
    """The thumbnails folder emptied for a new preview, so that it does not grow with each one.

    Emptying it is safe for pages that show earlier thumbnails: the gallery serves its own copies.
    """
    folder = thumbnails_dir()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def build(ctx: PageContext) -> SimpleNamespace:
    ui = SimpleNamespace()
    ctx.add_fields(fields.DATASET)
    ui.preview = gr.Button("Preview buckets", variant="primary", elem_id="bucket-preview-button")
    ui.message = gr.Markdown(elem_id="bucket-message")
    with gr.Row():
        ui.table = gr.Dataframe(headers=list(bucket_view.TABLE_COLUMNS), label="Buckets", interactive=False,
                                elem_id="bucket-table", scale=1)
        ui.chart = gr.BarPlot(x="bucket", y="images", label="Images per bucket (narrow to wide)",
                              elem_id="bucket-chart", y_lim=[0, None], x_label_angle=-45, height=260, scale=1)
    ui.skipped = gr.Dataframe(headers=list(bucket_view.SKIPPED_COLUMNS), label="Skipped images", interactive=False,
                              elem_id="skipped-table")
    ui.bucket = gr.Dropdown([], label="Show the images of bucket", elem_id="bucket-choice")
    ui.thumbnails = gr.Gallery(label="Crops used for training (outside the box is cut away; with masked loss, "
                                     "red tints what the mask leaves out)", columns=8,
                               height=300, object_fit="contain", elem_id="bucket-thumbnails")
    ui.report = gr.State(None)
    return ui


def preview(yaml_text: str, *values) -> list:
    """The preview button's outputs for the page's YAML and form values (fields.ALL order): message, bucket
    table, chart, skipped table, bucket choice, the first used bucket's thumbnails, and the report."""
    empty = [None, None, None, gr.update(choices=[], value=None), [], None]
    merged, message = configs.merge_form(yaml_text, list(values))
    if merged is None or message.startswith("Error:"):
        return [message, *empty]
    config, _ = configs.load(configs.parse_yaml(merged))
    try:
        result = bucket_view.report(config)
    except Exception as error:  # UserError (missing folder) or an engine fault: shown on the page
        return [f"Error: {error}", *empty]
    labels = [bucket_view.bucket_label(b) for b in result["buckets"]]
    used = [bucket_view.bucket_label(b) for b in result["buckets"] if b["count"]]
    first = used[0] if used else None
    summary = bucket_view.summary(result)
    if not config.data.center_crop:
        summary += " The boxes show the centre crop; training crops at a random position of the same size."
    # The chart keeps the buckets in aspect order rather than the default alphabetical one. Only the order
    # goes here, its data follows in chart_data: the plot redraws a new order with the data it already has.
    chart = gr.update(sort=labels)
    return [summary, bucket_view.table(result), chart, bucket_view.skipped(result),
            gr.update(choices=used, value=first),
            bucket_view.thumbnails(result, first, cleared_thumbnails_dir()) if first else [], result]


def chart_data(result: dict):
    """The chart's data for the last preview's report (None clears it): sent after the preview set the order."""
    return bucket_view.chart(result) if result else None


def show_bucket(result: dict, label: str) -> list[tuple[str, str]]:
    """The thumbnails of another bucket of the last preview's report."""
    return bucket_view.thumbnails(result, label, thumbnails_dir()) if result else []


def wire(ctx: PageContext, ui: SimpleNamespace) -> None:
    (ui.preview.click(preview, [ctx.yaml, *ctx.inputs],
                      [ui.message, ui.table, ui.chart, ui.skipped, ui.bucket, ui.thumbnails, ui.report],
                      api_visibility="private")
     .then(chart_data, ui.report, ui.chart, api_visibility="private"))
    ui.bucket.input(show_bucket, [ui.report, ui.bucket], ui.thumbnails, api_visibility="private")
