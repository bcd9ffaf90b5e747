"""The app's config text: YAML in and out, and the check shown before a job starts."""
from __future__ import annotations

import copy
from typing import Optional

import yaml

from engine import config as schema
from engine import notices, paths
from engine.errors import UserError

from . import fields
from .allowed import PathPolicy

LOCAL = PathPolicy.local()


def to_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def parse_yaml(text: str) -> dict:
    """The raw config dict of the editor's YAML text; raises ConfigError with the line of a syntax error."""
    return schema.parse_yaml(text or "")


def load(raw: dict) -> tuple[schema.Config, list[str]]:
    """The validated Config and the schema's notes (keys that are ignored); raises ConfigError."""
    notes: list[str] = []
    # Notices go to this thread's sink: a training thread's notices stay in its own log, not in these notes.
    with notices.collect(notes.append):
        config = schema.from_dict(copy.deepcopy(raw))
    return config, notes


def check_message(raw: dict, policy: PathPolicy = LOCAL) -> str:
    """One Markdown line: the config is ready, or what is wrong with it. A path outside the policy's folders
    is named as such before anything is said of whether it exists: a shared page tells nothing of the rest of
    the disk."""
    try:
        config, notes = load(raw)
        policy.check_config(config)
    except (schema.ConfigError, UserError) as error:
        return f"Error: {error}"
    missing = paths.missing_path(config)
    if missing:
        return f"Error: {missing}"
    return "The config is valid." + "".join(f"  \nNote: {note}" for note in notes)


def _misfit(raw: dict, policy: PathPolicy) -> str:
    """The check line when a form field cannot show its value in raw, else ''."""
    wrong = fields.misfits(raw, fields.ALL)
    if not wrong:
        return ""
    problem = check_message(raw, policy)
    return problem if problem.startswith("Error:") else "Error: the form cannot show " + ", ".join(wrong)


def _form_view(yaml_text: str, policy: PathPolicy) -> tuple[Optional[dict], str]:
    """(the raw config of a YAML text, or None with the reason the form cannot show or take it)."""
    try:
        raw = parse_yaml(yaml_text)
    except schema.ConfigError as error:
        return None, f"Error: {error}"
    problem = _misfit(raw, policy)
    return (None, problem) if problem else (raw, "")


def merge_form(yaml_text: str, values: list, policy: PathPolicy = LOCAL) -> tuple[Optional[str], str]:
    """(the YAML with the form's values written in, or None where the YAML cannot take them; check line).

    values are in fields.ALL order. A YAML that does not parse, or holds a value of the wrong type for a
    form field, is left as it is: writing the form over it would hide the user's edit.
    """
    raw, problem = _form_view(yaml_text, policy)
    if raw is None:
        return None, "Error: Fix the YAML first: " + problem.removeprefix("Error: ")
    try:
        merged = fields.apply_form(raw, fields.ALL, values)
    except fields.FormError as error:
        return None, f"Error: {error}"
    return to_yaml(merged), check_message(merged, policy)


def form_from_yaml(yaml_text: str, policy: PathPolicy = LOCAL) -> tuple[Optional[list], str]:
    """(the form's values for a YAML text in fields.ALL order, or None where it cannot show them; check line)."""
    raw, problem = _form_view(yaml_text, policy)
    if raw is None:
        return None, problem
    return fields.form_values(raw, fields.ALL), check_message(raw, policy)
