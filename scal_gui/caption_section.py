"""The Dataset tab's Captions section: the chosen dataset's images with their captions, one caption edited
and saved, a trigger word added or replaced, find and replace, and the tag counts (scal_gui.captions)."""
from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import gradio as gr

from engine.errors import UserError

from . import captions, datasets, thumbnails

PAGE_SIZE = 100   # images in the gallery at once; the edits of all captions reach every page
TAG_COLUMNS = ("tag", "count")
NO_IMAGE = "Caption (choose an image)"


@functools.cache
def thumbnails_dir() -> Path:
    """The app process's folder of caption thumbnails, removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="scal-sdt-caption-thumbs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def build(ui: SimpleNamespace) -> None:
    with gr.Accordion("Captions of the chosen dataset", open=True, elem_id="captions"):
        ui.caption_message = gr.Markdown(elem_id="caption-message")
        with gr.Row():
            with gr.Column(scale=3):
                ui.caption_gallery = gr.Gallery(label="Images (choose one to edit its caption)", columns=6,
                                                height=420, object_fit="contain", allow_preview=False,
                                                elem_id="caption-gallery")
                ui.caption_page = gr.Number(1, precision=0, minimum=1, label="Page", visible=False,
                                            elem_id="caption-page")
            with gr.Column(scale=2):
                ui.caption_text = gr.Textbox(label=NO_IMAGE, lines=4, elem_id="caption-text")
                with gr.Row():
                    ui.caption_save = gr.Button("Save caption", variant="primary", elem_id="caption-save")
                with gr.Row():
                    ui.caption_model = gr.Textbox(label="Captioner: a model folder or Hub id", min_width=100, scale=3,
                                                  elem_id="caption-model")
                    ui.caption_overwrite = gr.Checkbox(label="Replace captions", min_width=100, scale=1,
                                                       elem_id="caption-overwrite")
                    ui.caption_auto = gr.Button("Caption all", min_width=100, scale=1, elem_id="caption-auto")
                ui.caption_status = gr.Markdown(elem_id="caption-status")
                ui.caption_progress = gr.HTML(elem_id="caption-progress")
                with gr.Row():
                    ui.trigger_word = gr.Textbox(label="Trigger word (also put first in automatic captions)",
                                                 elem_id="trigger-word", min_width=100, scale=3)
                    ui.trigger_add = gr.Button("Add to all", elem_id="trigger-add", min_width=100, scale=1)
                with gr.Row():
                    ui.trigger_old = gr.Textbox(label="Replace the word", elem_id="trigger-old", min_width=100, scale=2)
                    ui.trigger_new = gr.Textbox(label="with", elem_id="trigger-new", min_width=100, scale=2)
                    ui.trigger_replace = gr.Button("Replace", elem_id="trigger-replace", min_width=100, scale=1)
                with gr.Row():
                    ui.find_text = gr.Textbox(label="Find (exact text)", elem_id="find-text", min_width=100, scale=2)
                    ui.replace_text = gr.Textbox(label="Replace with", elem_id="replace-text", min_width=100, scale=2)
                    ui.replace_all = gr.Button("Replace in all", elem_id="replace-all", min_width=100, scale=1)
                ui.tag_counts = gr.Dataframe(headers=list(TAG_COLUMNS), label="Tags (captions split on commas)",
                                             interactive=False, max_height=300, elem_id="tag-counts")
        # the images shown, each [image, caption]; and the image whose caption is in the text box
        ui.caption_entries = gr.State([])
        ui.caption_selected = gr.State(None)


def outputs(ui: SimpleNamespace) -> list:
    """What every handler of the section returns, in this order."""
    return [ui.caption_message, ui.caption_gallery, ui.caption_page, ui.caption_entries, ui.tag_counts,
            ui.caption_selected, ui.caption_text]


def view(folder: Path, name: Optional[str], page=1, selected: Optional[str] = None, message: str = "") -> list:
    """The section for the dataset `name` of the data folder: message (the dataset's counts unless given),
    gallery of one page of images, page number, the page's entries, tag counts, the selected image (kept
    when it is still in the dataset) and its caption."""
    if not name:
        return [message, [], gr.update(value=1, visible=False), [], [], None,
                gr.update(value="", label=NO_IMAGE)]
    path = datasets.dataset_path(folder, name)
    found = captions.entries(path)
    pages = max(1, math.ceil(len(found) / PAGE_SIZE))
    page = min(max(1, int(page or 1)), pages)
    shown = found[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]
    chosen = next((entry for entry in found if entry.image == selected), None)
    if not message:
        message = f"{name}: {len(found)} images, {sum(bool(e.caption) for e in found)} captioned"
        message += f", page {page} of {pages}." if pages > 1 else "."
    index = shown.index(chosen) if chosen in shown else None
    gallery = gr.update(value=[_item(path, entry) for entry in shown], selected_index=index)
    text = (gr.update(value=chosen.caption, label=f"Caption of {chosen.image}") if chosen
            else gr.update(value="", label=NO_IMAGE))
    return [message, gallery, gr.update(value=page, maximum=pages, label=f"Page (of {pages})", visible=pages > 1),
            [[entry.image, entry.caption] for entry in shown], [list(row) for row in captions.tag_counts(path)],
            chosen.image if chosen else None, text]


def _item(path: Path, entry: captions.Entry) -> tuple:
    """(thumbnail, label) of one image; an image that cannot be read is a grey square, its label says why."""
    label = f"{entry.image}: {entry.caption}" if entry.caption else f"{entry.image} (no caption)"
    try:
        return str(thumbnails.plain(str(path / entry.image), thumbnails_dir())), label
    except Exception as error:  # PIL raises many types for unreadable and corrupt files
        from PIL import Image

        grey = Image.new("RGB", (thumbnails.THUMB_SIDE, thumbnails.THUMB_SIDE), (128, 128, 128))
        return grey, f"{entry.image} cannot be read ({error.__class__.__name__}): {entry.caption or 'no caption'}"


def _refused(error: Exception) -> list:
    if isinstance(error, OSError) and error.strerror:
        error = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return [f"Error: {error}", *[gr.skip()] * 6]


def show(folder: Path, name: Optional[str], page=1) -> list:
    """A dataset chosen, or another page: the section without a selected image."""
    try:
        return view(folder, name, page)
    except (UserError, OSError) as error:
        return _refused(error)


def choose(entries: list, evt: gr.SelectData) -> tuple:
    """An image chosen in the gallery: (selected image, the caption text box showing its caption)."""
    if not evt.selected or not 0 <= evt.index < len(entries):   # clicked again: no image chosen
        return None, gr.update(value="", label=NO_IMAGE)
    image, caption = entries[evt.index]
    return image, gr.update(value=caption, label=f"Caption of {image}")


def save(folder: Path, name: Optional[str], page, image: Optional[str], text: str) -> list:
    try:
        saved = captions.save_caption(_dataset(folder, name), image, text)
        return view(folder, name, page, saved.image, f"Saved the caption of {saved.image} in {saved.caption_file}.")
    except (UserError, OSError) as error:
        return _refused(error)


def add_trigger(folder: Path, name: Optional[str], page, selected: Optional[str], word: str) -> list:
    try:
        count = captions.add_trigger(_dataset(folder, name), word)
        return view(folder, name, page, selected, f"Added {word.strip()!r} to {_captions(count)}.")
    except (UserError, OSError) as error:
        return _refused(error)


def replace_trigger(folder: Path, name: Optional[str], page, selected: Optional[str], old: str, new: str) -> list:
    try:
        count = captions.replace_trigger(_dataset(folder, name), old, new)
        return view(folder, name, page, selected,
                    f"Replaced {old.strip()!r} with {new.strip()!r} in {_captions(count)}.")
    except (UserError, OSError) as error:
        return _refused(error)


def find_replace(folder: Path, name: Optional[str], page, selected: Optional[str], find: str, replace: str) -> list:
    try:
        count = captions.find_replace(_dataset(folder, name), find, replace)
        return view(folder, name, page, selected, f"Replaced {find!r} with {replace!r} in {_captions(count)}.")
    except (UserError, OSError) as error:
        return _refused(error)


def _dataset(folder: Path, name: Optional[str]) -> Path:
    if not name:
        raise UserError("choose a dataset first")
    return datasets.dataset_path(folder, name)


def _captions(count: int) -> str:
    return "1 caption" if count == 1 else f"{count} captions"


def caption_all(actions, folder: Path, name: Optional[str], model: str, prefix: str, overwrite: bool) -> str:
    """Queue the captioning of the chosen dataset (it starts at once when nothing else runs)."""
    try:
        path = _dataset(folder, name)
    except UserError as error:
        return f"Error: {error}"
    return actions.queue_captioning(str(path), model, prefix, overwrite)


def wire(folder: Path, ui: SimpleNamespace, uploaded, actions) -> None:
    """uploaded: the upload's event, after which the section shows the dataset as it now is. actions: the page's,
    which queue automatic captioning; its progress reaches caption_status and caption_progress from the page's
    poll, and a changed status (the job ended) shows the captions again."""
    out = outputs(ui)
    # one edit at a time, from any browser tab: two edits of all captions must not interleave
    edits = {"api_visibility": "private", "concurrency_id": "captions", "concurrency_limit": 1}
    ui.datasets.input(functools.partial(show, folder), ui.datasets, out, **edits)
    uploaded.then(functools.partial(show, folder), ui.datasets, out, **edits)
    ui.caption_page.submit(functools.partial(show, folder), [ui.datasets, ui.caption_page], out, **edits)
    ui.caption_gallery.select(choose, ui.caption_entries, [ui.caption_selected, ui.caption_text],
                              api_visibility="private")
    shared = [ui.datasets, ui.caption_page, ui.caption_selected]
    ui.caption_save.click(functools.partial(save, folder), [*shared, ui.caption_text], out, **edits)
    ui.trigger_add.click(functools.partial(add_trigger, folder), [*shared, ui.trigger_word], out, **edits)
    ui.trigger_replace.click(functools.partial(replace_trigger, folder), [*shared, ui.trigger_old, ui.trigger_new],
                             out, **edits)
    ui.replace_all.click(functools.partial(find_replace, folder), [*shared, ui.find_text, ui.replace_text], out,
                         **edits)
    ui.caption_auto.click(functools.partial(caption_all, actions, folder),
                          [ui.datasets, ui.caption_model, ui.trigger_word, ui.caption_overwrite], ui.caption_status,
                          api_visibility="private")
    ui.caption_status.change(functools.partial(show, folder), [ui.datasets, ui.caption_page], out, **edits)
