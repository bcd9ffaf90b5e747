"""The Train tab: preset, settings, YAML, Start/Stop/Resume, and the live view of the run."""
from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import gradio as gr

from engine import config as schema
from engine.errors import UserError

from . import configs, fields, presets, runs
from .allowed import PathPolicy
from .context import PageContext, sync_form

IDLE = "No run yet: pick a preset, check the settings and press Start."


def resume_choices(output_dir: str, active: Optional[str] = None,
                   policy: PathPolicy = PathPolicy.local()) -> list[tuple[str, str]]:
    """The runs of the output folder that can be resumed; none when the policy does not allow the folder."""
    try:
        policy.check("config key 'output_dir'", output_dir or schema.Config().output_dir)
        found = runs.resumable(runs.list_runs(output_dir, active))
    except (OSError, UserError):
        return []
    return [(run.label, str(run.path)) for run in found]


# What the user brings rather than how to train: a preset leaves these as the user typed them.
USER_KEYS = ("model", "output_dir", "data.concepts[0].instance_set.path", "data.concepts[0].instance_set.prompt",
             "data.concepts[0].instance_set.mask_path", "data.concepts[0].instance_set.control_path",
             "data.concepts[0].class_set.path", "data.concepts[0].class_set.prompt",
             "data.concepts[0].class_set.auto_generate.negative_prompt", "validation.path",
             "sampling.concepts[0].prompt", "sampling.concepts")
PRESET_INFO = "sets the training settings; a model, folder or prompt you typed is kept"


def preset_config(preset: presets.Preset, previous: presets.Preset, values: list,
                  output_dir: Optional[str]) -> dict:
    """The raw config of a newly picked preset, with the form's USER_KEYS values that the user changed from
    the previous preset's (values in fields.ALL order); the others take the new preset's."""
    raw = presets.load_preset(preset, output_dir)
    before = fields.form_values(presets.load_preset(previous, output_dir), fields.ALL)
    for index, spec in enumerate(fields.ALL):
        # Compared as config values: the page sends a table's numbers back in its own types (4.0 for 4).
        if spec.key in USER_KEYS and spec.from_form(values[index]) != spec.from_form(before[index]):
            fields.set_value(raw, spec.key, spec.from_form(values[index]))
    return raw


DEMO_NOTE = ("The demo model is a tiny random network: its samples stay noise however long it trains. "
             "The falling loss is what shows that training works.")


def sample_note(model: str) -> str:
    """The line above the samples: why a demo model's samples are noise, else nothing."""
    return DEMO_NOTE if str(model or "").startswith("demo:") else ""


def preset_choices(preset_list: list[presets.Preset]) -> list[tuple[str, str]]:
    return [(p.label, p.name) for p in preset_list]


def save_preset(name: str, yaml_text: str, *values, policy: PathPolicy = PathPolicy.local()) -> list:
    """[message, preset dropdown, previous preset, description] after saving the form as the user's preset."""
    unchanged = [gr.skip()] * 3
    merged, message = configs.merge_form(yaml_text, list(values), policy)
    if merged is None:
        return [f"Not saved: {message.removeprefix('Error: ')}", *unchanged]
    raw = configs.parse_yaml(merged)
    try:
        # Refused only for what the schema refuses: a folder missing on this machine is no reason not to save.
        configs.load(raw)
        preset = presets.save_user_preset(name, raw)
    except (schema.ConfigError, presets.PresetError, OSError) as error:
        return [f"Not saved: {error}", *unchanged]
    return [f"Saved the preset **{preset.name}** as `{preset.path}`.",
            gr.update(choices=preset_choices(presets.all_presets()), value=preset.name), preset.name,
            preset.description]


def load_config_file(path: Optional[str], policy: PathPolicy = PathPolicy.local()) -> list:
    """[message, YAML, check, *form values] for an uploaded config file; a file that does not load as a valid
    config changes nothing but the message."""
    unchanged = [gr.skip()] * (2 + len(fields.ALL))
    if not path:
        return [gr.skip(), *unchanged]
    name = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [f"Not loaded: {name}: the file is not UTF-8 text", *unchanged]
    except OSError as error:
        return [f"Not loaded: {name}: {error.strerror or error}", *unchanged]
    values, check = configs.form_from_yaml(text, policy)
    problem = check if values is None else ""
    if values is not None:
        try:
            # What the schema refuses; a folder missing on this machine only shows in the check line.
            configs.load(configs.parse_yaml(text))
        except schema.ConfigError as error:
            problem = str(error)
    if problem:
        first = problem.removeprefix("Error: ").strip().splitlines()[0]
        return [f"Not loaded: {name}: {first}", *unchanged]
    # The file's own text goes into the editor: its comments and order are the user's.
    return [f"Loaded `{name}`.", text, check, *values]


def running_config(manager, policy: PathPolicy = PathPolicy.local()) -> Optional[list]:
    """[message, YAML text, check line, form values…] of the training run in progress, for a page opened
    while it runs, so that the form shows what trains rather than the default preset; None when no run
    with a config is in progress."""
    run_dir = manager.active_run_dir()
    if not run_dir:
        return None
    try:
        text = (Path(run_dir) / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    values, check = configs.form_from_yaml(text, policy)
    if values is None:
        return None
    return [f"Showing the config of the run in progress (`{run_dir}`).", text, check, *values]


def first_prompt_to_table(prompt: str, rows: Optional[list]) -> list:
    """The sample table with its first prompt set to the Sample prompt box's text."""
    rows = [list(row) for row in rows or [] if row]
    if not rows:
        return fields.SAMPLES[0].to_form([{"prompt": prompt}])
    rows[0][0] = prompt
    return rows


def table_to_first_prompt(rows: Optional[list]) -> str:
    """The Sample prompt box's text for the sample table: its first row that is not blank."""
    for row in rows or []:
        if row and not all(fields.blank(cell) for cell in row):
            return "" if fields.blank(row[0]) else str(row[0])
    return ""


def machine_memory() -> list:
    """[GPU memory, system RAM] of this machine in GiB, for the Fit row; None where it cannot be read. torch
    is imported only where an NVIDIA GPU is visible."""
    vram = None
    if presets.has_cuda_gpu():
        import torch

        if torch.cuda.is_available():
            vram = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return [vram, system_ram_gib()]


def system_ram_gib() -> Optional[float]:
    """Total system memory in GiB: psutil's where it is installed, else /proc/meminfo's; None if neither says."""
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 2**30, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def fit_to_card(actions, yaml_text: str, vram_gib, ram_gib, policy: PathPolicy = PathPolicy.local()) -> list:
    """[message, YAML, check, *form values] after the memory plan; only the message when nothing fits."""
    message, fitted = actions.fit_memory(yaml_text, vram_gib, ram_gib)
    values, check = configs.form_from_yaml(fitted, policy) if fitted is not None else (None, "")
    if values is None:
        return [message] + [gr.skip()] * (2 + len(fields.ALL))
    return [message, fitted, check, *values]


def build(ctx: PageContext, preset_list: list[presets.Preset], selected: presets.Preset) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=5):
            with gr.Row(equal_height=True):
                ui.preset = gr.Dropdown(preset_choices(preset_list), value=selected.name, label="Preset",
                                        info=PRESET_INFO, elem_id="preset", scale=1)
                ui.previous_preset = gr.State(selected.name)
                ui.description = gr.Markdown(selected.description, elem_id="preset-description")
            with gr.Accordion("Save the form as a preset, or load a config file", open=False,
                              elem_id="own-presets"):
                with gr.Row(equal_height=True):
                    ui.preset_name = gr.Textbox(label="Preset name", placeholder="my-settings", max_lines=1,
                                                info=f"saved in {presets.USER_PRESETS_DIR}", elem_id="preset-name",
                                                scale=3)
                    ui.save_preset = gr.Button("Save as preset", elem_id="save-preset", scale=1)
                    ui.upload = gr.File(label="Load a config file", file_types=[".yaml", ".yml"], type="filepath",
                                        elem_id="config-upload", height=110, scale=3)
                ui.preset_message = gr.Markdown(elem_id="preset-message")
            with gr.Accordion("Settings", open=True):
                ctx.add_fields(fields.TRAIN, per_row=3)
            with gr.Accordion("Sample prompts: negative prompt, steps, CFG, seed, size, several prompts",
                              open=False, elem_id="sample-prompts"):
                gr.Markdown(fields.SAMPLES[0].info)
                ctx.add_fields(fields.SAMPLES, per_row=1)
            # Open when the page's config trains an adapter, so that its settings are in sight.
            adapter = fields.get_value(ctx.raw, "network.type") != "full"
            with gr.Accordion("Network: full fine-tuning or a LoRA-family adapter", open=adapter,
                              elem_id="network-section"):
                ctx.add_fields(fields.NETWORK, per_row=4)
            with gr.Accordion("Advanced training options (augmentations: in the YAML, key augment)", open=False):
                ctx.add_fields(fields.ADVANCED, per_row=3)
            # Fitting rewrites the YAML, shown below it; closed, the accordion keeps the column short enough for
            # the live view to stay in the window beside Start.
            with gr.Accordion("Advanced: the whole config as YAML, and fitting it to your card", open=False):
                with gr.Row(equal_height=True, elem_id="fit-row"):
                    # The machine's own sizes arrive with the page load (machine_memory).
                    ui.fit_vram = gr.Number(label="GPU memory (GiB)", minimum=0, elem_id="fit-vram", scale=1)
                    ui.fit_ram = gr.Number(label="System RAM (GiB)", minimum=0, elem_id="fit-ram", scale=1)
                    ui.fit = gr.Button("Fit to my card", elem_id="fit-button", scale=1)
                ctx.yaml = gr.Code(configs.to_yaml(ctx.raw), language="yaml", lines=18, max_lines=40,
                                   interactive=True, label="config.yaml", elem_id="config-yaml")
            ctx.check = gr.Markdown(configs.check_message(ctx.raw, ctx.policy), elem_id="config-check")
            # One line of buttons each (narrower than their default), so that the column does not grow.
            with gr.Row():
                ui.start = gr.Button("Start", variant="primary", elem_id="start-button", min_width=90)
                ui.enqueue = gr.Button("Add to queue", elem_id="queue-button", min_width=90)
                ui.stop = gr.Button("Stop", variant="stop", elem_id="stop-button", min_width=90)
                ui.vram = gr.Button("Estimate GPU memory", elem_id="vram-button", min_width=90)
            ui.message = gr.Markdown(elem_id="job-message")
            with gr.Row(equal_height=True):
                # A custom value is a run folder typed in, for runs outside the output folder.
                ui.resume_run = gr.Dropdown([], label="Previous runs", elem_id="resume-run", scale=4,
                                            allow_custom_value=True)
                ui.refresh = gr.Button("↻", elem_id="refresh-runs", scale=0, min_width=50)
                ui.resume = gr.Button("Resume", elem_id="resume-button", scale=1, min_width=90)
                ui.enqueue_resume = gr.Button("Queue resume", elem_id="queue-resume-button", scale=1, min_width=90)
        # Start is far down the settings column: the live view stays in sight as it scrolls (live.CSS).
        with gr.Column(scale=6, elem_id="live-view"):
            ui.status = gr.Markdown(IDLE, elem_id="train-status")
            ui.progress = gr.HTML(elem_id="train-progress")
            ui.loss = gr.LinePlot(x="step", y="loss", color="series",
                                  label="Loss: raw (grey), smoothed (orange), validation (blue)", elem_id="loss-plot",
                                  color_map={"raw": "#94a3b8", "smoothed": "#ea580c", "validation": "#2563eb"},
                                  x_axis_format="d", height=280)
            ui.lr = gr.LinePlot(x="step", y="lr", label="Learning rate", x_axis_format="d", y_axis_format=".1e",
                                elem_id="lr-plot", height=160)
            note = sample_note(fields.get_value(ctx.raw, "model"))
            ui.sample_note = gr.Markdown(note, visible=bool(note), elem_id="sample-note")
            ui.gallery = gr.Gallery(label="Samples", columns=6, height=200, object_fit="contain",
                                    elem_id="sample-gallery")
            ui.log = gr.Textbox(label="Log", lines=7, max_lines=7, autoscroll=True, interactive=False,
                                elem_id="train-log")
    return ui


def wire(ctx: PageContext, ui: SimpleNamespace, page: gr.Blocks) -> None:
    actions = ctx.actions
    synced = functools.partial(sync_form, policy=ctx.policy)

    def choose_preset(name: str, previous: str, *values):
        # Listed again: a preset saved since the page was built is offered too.
        by_name = {p.name: p for p in presets.all_presets()}
        preset = by_name[name]
        raw = preset_config(preset, by_name.get(previous, preset), list(values), ctx.output_dir)
        return [name, preset.description, configs.to_yaml(raw), configs.check_message(raw, ctx.policy),
                *fields.form_values(raw, fields.ALL)]

    ui.preset.input(choose_preset, [ui.preset, ui.previous_preset, *ctx.inputs],
                    [ui.previous_preset, ui.description, ctx.yaml, ctx.check, *ctx.inputs], api_visibility="private")

    ui.save_preset.click(functools.partial(save_preset, policy=ctx.policy), [ui.preset_name, ctx.yaml, *ctx.inputs],
                         [ui.preset_message, ui.preset, ui.previous_preset, ui.description], api_visibility="private")
    ui.upload.upload(functools.partial(load_config_file, policy=ctx.policy), ui.upload,
                     api_visibility="private")

    def show_running_config():
        shown = running_config(ctx.manager, ctx.policy)
        return shown if shown is not None else [gr.skip()] * (3 + len(ctx.inputs))

    # in place of the preset's description, which no longer describes the form
    page.load(show_running_config, None, [ui.description, ctx.yaml, ctx.check, *ctx.inputs],
              api_visibility="private")

    # The Sample prompt box and the sample table's first row are one key: an edit of either redraws the other.
    prompt, table = ctx.form["sampling.concepts[0].prompt"], ctx.form[fields.SAMPLES[0].key]
    prompt.input(first_prompt_to_table, [prompt, table], table, api_visibility="private")
    table.input(table_to_first_prompt, table, prompt, api_visibility="private")

    def show_note(model: str):
        note = sample_note(model)
        return gr.update(value=note, visible=bool(note))

    ctx.form["model"].change(show_note, ctx.form["model"], ui.sample_note, api_visibility="private")

    (ui.start.click(synced, [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(actions.start_training, ctx.yaml, ui.message, api_name="start_training"))
    (ui.enqueue.click(synced, [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(actions.queue_training, ctx.yaml, ui.message, api_name="queue_training"))
    ui.stop.click(actions.stop, None, ui.message, api_name="stop_job")
    ui.resume.click(actions.resume_training, ui.resume_run, ui.message, api_name="resume_training")
    ui.enqueue_resume.click(actions.queue_resume, ui.resume_run, ui.message, api_name="queue_resume")

    def refresh_runs(output_dir: str):
        return gr.update(choices=resume_choices(output_dir, ctx.manager.active_run_dir(), ctx.policy))

    ui.refresh.click(refresh_runs, ctx.form["output_dir"], ui.resume_run, api_visibility="private")
    (ui.vram.click(synced, [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(actions.estimate_vram, ctx.yaml, ui.message, api_visibility="private"))

    page.load(machine_memory, None, [ui.fit_vram, ui.fit_ram], api_visibility="private")

    def fit(yaml_text: str, vram_gib, ram_gib):
        return fit_to_card(actions, yaml_text, vram_gib, ram_gib, ctx.policy)

    # the form goes into the YAML first, and the chosen settings come back into both
    (ui.fit.click(synced, [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(fit, [ctx.yaml, ui.fit_vram, ui.fit_ram], [ui.message, ctx.yaml, ctx.check, *ctx.inputs],
              api_visibility="private"))
