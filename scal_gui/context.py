"""What every tab of one page shares: the job manager, the actions and the config form's inputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import gradio as gr

from . import configs, fields
from .actions import Actions
from .allowed import PathPolicy
from .datasets import MAX_UPLOAD_BYTES
from .jobs import JobManager


@dataclass
class PageContext:
    manager: JobManager
    actions: Actions
    output_dir: Optional[str]          # the app's output folder, replacing each preset's
    raw: dict                          # the config the page opens with
    form: dict = field(default_factory=dict)  # config key -> its input component
    yaml: Optional[gr.Code] = None
    check: Optional[gr.Markdown] = None
    data_dir: Optional[str] = None     # the app's data folder of uploaded datasets (None: datasets' default)
    policy: PathPolicy = field(default_factory=PathPolicy.local)  # where the page may read and write
    max_upload_bytes: int = MAX_UPLOAD_BYTES  # an upload's limit, and the largest file offered for download

    def add_fields(self, specs: tuple[fields.Field, ...], per_row: int = 4) -> None:
        """Lay out inputs for specs, in rows, with the page's starting values."""
        from .widgets import component

        values = fields.form_values(self.raw, specs)
        for start in range(0, len(specs), per_row):
            with gr.Row():
                for spec, value in zip(specs[start:start + per_row], values[start:start + per_row]):
                    self.form[spec.key] = component(spec, value)

    @property
    def inputs(self) -> list:
        """Every config input in fields.ALL order: the argument order of configs.merge_form."""
        return [self.form[spec.key] for spec in fields.ALL]


def sync_form(yaml_text: str, *values, policy: PathPolicy = PathPolicy.local()) -> tuple[str, str]:
    """The first step of every button that runs a job: write the form into the YAML the job will read.

    Raising stops the chain, so a form the YAML cannot take never starts a job from stale text.
    """
    merged, message = configs.merge_form(yaml_text, list(values), policy)
    if merged is None:
        raise gr.Error(message.removeprefix("Error: "))
    return merged, message
