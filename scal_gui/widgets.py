"""Gradio inputs for config fields: the field's kind picks the component, the schema its choices."""
from __future__ import annotations

import re
from typing import Any

import gradio as gr

from .fields import Field, SampleTable


def elem_id(key: str) -> str:
    return "field-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def component(field: Field, value: Any) -> gr.components.Component:
    common = {"label": field.label, "elem_id": elem_id(field.key)}
    info = field.info or None
    if isinstance(field, SampleTable):
        columns = [field.column(0, name) for name in field.COLUMNS]
        # Optional numbers are text cells, as in the form's text boxes: empty means None, not 0.
        types = ["number" if c.kind in ("int", "float") and not c.typed_as_text else "str" for c in columns]
        return gr.Dataframe(value=value, headers=list(field.COLUMNS), datatype=types, type="array",
                            row_count=len(value), interactive=True, label=field.label, show_label=True,
                            elem_id=common["elem_id"], wrap=True)
    if field.kind == "bool":
        return gr.Checkbox(value=value, info=info, **common)
    if field.typed_as_text:
        return gr.Textbox(value=value, info=info, lines=1, max_lines=1, placeholder="empty", **common)
    if field.kind == "int":
        return gr.Number(value=value, info=info, precision=0, **common)
    if field.kind == "float":
        # step="any" semantics: a learning rate of 1e-6 must not be rounded by the input's step.
        return gr.Number(value=value, info=info, step=1e-9, **common)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=value, info=info,
                           allow_custom_value=bool(field.suggestions), **common)
    return gr.Textbox(value=value, info=info, lines=1, max_lines=1, **common)
