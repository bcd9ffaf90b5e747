"""The Queue tab: the jobs waiting their turn, the one running and those that ended, with Cancel and Move up."""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Optional

import gradio as gr

from .context import PageContext
from .run_queue import QUEUED, RUNNING, Entry

HEADERS = ["#", "kind", "job", "state", "run folder", "added", "note"]
EMPTY = "Nothing queued: **Add to queue** on the Train, Class images or Convert tab queues a job behind the one running."


def rows(entries: list[Entry]) -> list[list]:
    """The table: queued entries numbered in the order they will run, the running one as 0."""
    table, position = [], 0
    for entry in entries:
        if entry.state == QUEUED:
            position += 1
        number = position if entry.state == QUEUED else (0 if entry.state == RUNNING else "")
        table.append([str(number), entry.kind, entry.label, entry.state, entry.run_dir,
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.added_at)), entry.error])
    return table


def choices(entries: list[Entry]) -> list[tuple[str, str]]:
    """(label, id) of the entries Cancel and Move up can act on: the running one and those queued."""
    table = rows(entries)
    return [(f"{'running' if entry.state == RUNNING else row[0]}: {entry.label}", entry.id)
            for entry, row in zip(entries, table) if entry.state in (QUEUED, RUNNING)]


def build(ctx: PageContext) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.note = gr.Markdown(EMPTY, elem_id="queue-note")
    ui.table = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=True, elem_id="queue-table")
    with gr.Row(equal_height=True):
        # Custom values let API clients name an entry by its id (from /queue_list).
        ui.entry = gr.Dropdown([], label="Entry", elem_id="queue-entry", scale=4, allow_custom_value=True)
        ui.cancel = gr.Button("Cancel", variant="stop", elem_id="queue-cancel", scale=1)
        ui.move_up = gr.Button("Move up", elem_id="queue-move-up", scale=1)
    ui.message = gr.Markdown(elem_id="queue-message")
    return ui


def render(run_queue, seen: Optional[int], selected: Optional[str]) -> tuple[list, int]:
    """([note, table, entry dropdown] updates, the queue version they show) for the page's poll; all skipped
    when the queue has not changed since seen, the version this browser tab last drew."""
    version = run_queue.version()
    if seen == version:
        return [gr.skip()] * 3, version
    entries = run_queue.entries()
    offered = choices(entries)
    ids = [value for _, value in offered]
    keep = selected if selected in ids else (ids[0] if ids else None)
    note = EMPTY if not any(e.state in (QUEUED, RUNNING) for e in entries) else ""
    return [note, rows(entries), gr.update(choices=offered, value=keep)], version


def wire(ctx: PageContext, ui: SimpleNamespace) -> None:
    """The buttons; the list is redrawn by the page's poll (page._wire_live, with render)."""
    ui.cancel.click(ctx.actions.cancel_entry, ui.entry, ui.message, api_name="queue_cancel")
    ui.move_up.click(ctx.actions.move_up, ui.entry, ui.message, api_name="queue_move_up")
    gr.api(ctx.actions.queue_list, api_name="queue_list")
