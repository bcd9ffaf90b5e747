"""The Dataset tab: datasets uploaded through the page and their captions (caption_section), folders,
resolution and buckets; what training will make of the images."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from engine.data import archive
from engine.errors import UserError

from . import bucket_view, caption_section, configs, datasets, fields
from .allowed import PathPolicy
from .context import PageContext

INSTANCE_PATH = f"{fields._CONCEPT}.instance_set.path"
# What the file picker offers and gradio accepts (by the name's ending; .gz rather than .tar.gz, which some
# pickers do not match). A .gz that is not a tar is skipped by datasets.add_files.
UPLOAD_TYPES = [*archive.IMAGE_EXTENSIONS, *archive.CAPTION_EXTENSIONS, ".zip", ".tar", ".gz", ".tgz", ".bz2",
                ".tbz2", ".tbz", ".xz", ".txz"]


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


def data_dir(ctx: PageContext) -> Path:
    return Path(ctx.data_dir) if ctx.data_dir else datasets.default_data_dir()


def dataset_choices(folder: Path) -> list[tuple[str, str]]:
    """The dropdown's (label with counts, name) of each dataset of the data folder."""
    try:
        return [(info.label(), info.name) for info in datasets.list_datasets(folder)]
    except OSError:
        return []


def build_uploads(ctx: PageContext, ui: SimpleNamespace) -> None:
    folder = data_dir(ctx)
    with gr.Accordion("Your datasets: upload images, captions and masks", open=True):
        gr.Markdown(f"Images (jpg, png, webp, bmp), `.txt` captions, `name.mask.png` masks, or a .zip / .tar(.gz) "
                    f"of them, become a dataset in `{folder}`.", elem_id="dataset-upload-help")
        with gr.Row():
            ui.upload = gr.File(file_count="multiple", file_types=UPLOAD_TYPES, label="Files to add",
                                elem_id="dataset-upload", scale=3)
            with gr.Column(scale=2):
                ui.dataset_name = gr.Textbox(label="Dataset name", placeholder="letters, digits, - and _",
                                             elem_id="dataset-name")
                ui.add = gr.Button("Add to dataset", variant="primary", elem_id="dataset-add-button")
        ui.upload_message = gr.Markdown(elem_id="dataset-upload-message")
        with gr.Row():
            choices = dataset_choices(folder)
            ui.datasets = gr.Dropdown(choices, value=None, label="Datasets (choosing one previews it below)",
                                      elem_id="dataset-choice", scale=6)
            ui.refresh_datasets = gr.Button("↻", elem_id="refresh-datasets", scale=0, min_width=50)


def add_uploads(folder: Path, name: str, files, max_upload_bytes: int = datasets.MAX_UPLOAD_BYTES) -> tuple[str, dict]:
    """The Add button: (message, the dataset dropdown updated and showing the dataset)."""
    uploads = [(Path(getattr(f, "name", f)).name, getattr(f, "name", f)) for f in files or []]
    try:
        report = datasets.add_files(folder, name, uploads, max_upload_bytes=max_upload_bytes)
    except UserError as error:
        return f"Error: {error}", gr.update(choices=dataset_choices(folder))
    except OSError as error:
        return f"Error: {error.strerror or error}", gr.update(choices=dataset_choices(folder))
    choices = dataset_choices(folder)
    shown = report.dataset if any(value == report.dataset for _, value in choices) else None
    return report.message(), gr.update(choices=choices, value=shown)


def choose_dataset(folder: Path, name: str):
    """The dataset's folder for the instance folder field (the preview and training read it)."""
    if not name:
        return gr.skip()
    try:
        return str(datasets.dataset_path(folder, name))
    except UserError:
        return gr.skip()


def build(ctx: PageContext) -> SimpleNamespace:
    ui = SimpleNamespace()
    build_uploads(ctx, ui)
    caption_section.build(ui)
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


def preview(yaml_text: str, *values, policy: PathPolicy = PathPolicy.local()) -> list:
    """The preview button's outputs for the page's YAML and form values (fields.ALL order): message, bucket
    table, chart, skipped table, bucket choice, the first used bucket's thumbnails, and the report. policy:
    where the preview may read."""
    empty = [None, None, None, gr.update(choices=[], value=None), [], None]
    merged, message = configs.merge_form(yaml_text, list(values), policy)
    if merged is None or message.startswith("Error:"):
        return [message, *empty]
    config, _ = configs.load(configs.parse_yaml(merged))
    try:
        policy.check_config(config)
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


def sync_yaml(yaml_text: str, *values, policy: PathPolicy = PathPolicy.local()):
    """The YAML editor after the form changed by the page (not by typing): the form written in."""
    merged, message = configs.merge_form(yaml_text, list(values), policy)
    return (gr.skip() if merged is None else merged), message


def wire(ctx: PageContext, ui: SimpleNamespace) -> None:
    folder = data_dir(ctx)
    checked = functools.partial(preview, policy=ctx.policy)
    preview_outputs = [ui.message, ui.table, ui.chart, ui.skipped, ui.bucket, ui.thumbnails, ui.report]
    (ui.preview.click(checked, [ctx.yaml, *ctx.inputs], preview_outputs, api_visibility="private")
     .then(chart_data, ui.report, ui.chart, api_visibility="private"))
    uploaded = ui.add.click(functools.partial(add_uploads, folder, max_upload_bytes=ctx.max_upload_bytes),
                            [ui.dataset_name, ui.upload], [ui.upload_message, ui.datasets],
                            api_visibility="private", concurrency_limit=1)
    caption_section.wire(folder, ui, uploaded, ctx.actions)
    ui.refresh_datasets.click(lambda: gr.update(choices=dataset_choices(folder)), None, ui.datasets,
                              api_visibility="private")
    (ui.datasets.input(functools.partial(choose_dataset, folder), ui.datasets, ctx.form[INSTANCE_PATH],
                       api_visibility="private")
     .then(functools.partial(sync_yaml, policy=ctx.policy), [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .then(checked, [ctx.yaml, *ctx.inputs], preview_outputs, api_visibility="private")
     .then(chart_data, ui.report, ui.chart, api_visibility="private"))
    ui.bucket.input(show_bucket, [ui.report, ui.bucket], ui.thumbnails, api_visibility="private")
