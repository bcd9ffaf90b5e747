"""The Train tab: preset, settings, YAML, Start/Stop/Resume, and the live view of the run."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import gradio as gr

from . import configs, fields, presets, runs
from .context import PageContext, sync_form

IDLE = "No run yet: pick a preset, check the settings and press Start."


def resume_choices(output_dir: str, active: Optional[str] = None) -> list[tuple[str, str]]:
    try:
        found = runs.resumable(runs.list_runs(output_dir, active))
    except OSError:
        return []
    return [(run.label, str(run.path)) for run in found]


# What the user brings rather than how to train: a preset leaves these as the user typed them.
USER_KEYS = ("model", "output_dir", "data.concepts[0].instance_set.path", "data.concepts[0].instance_set.prompt",
             "data.concepts[0].instance_set.mask_path", "data.concepts[0].class_set.path",
             "data.concepts[0].class_set.prompt", "data.concepts[0].class_set.auto_generate.negative_prompt",
             "validation.path", "sampling.concepts[0].prompt")
PRESET_INFO = "sets the training settings; a model, folder or prompt you typed is kept"


def preset_config(preset: presets.Preset, previous: presets.Preset, values: list,
                  output_dir: Optional[str]) -> dict:
    """The raw config of a newly picked preset, with the form's USER_KEYS values that the user changed from
    the previous preset's (values in fields.ALL order); the others take the new preset's."""
    raw = presets.load_preset(preset, output_dir)
    before = fields.form_values(presets.load_preset(previous, output_dir), fields.ALL)
    for index, spec in enumerate(fields.ALL):
        if spec.key in USER_KEYS and values[index] != before[index]:
            fields.set_value(raw, spec.key, spec.from_form(values[index]))
    return raw


def build(ctx: PageContext, preset_list: list[presets.Preset], selected: presets.Preset) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=5):
            with gr.Row(equal_height=True):
                ui.preset = gr.Dropdown([p.name for p in preset_list], value=selected.name, label="Preset",
                                        info=PRESET_INFO, elem_id="preset", scale=1)
                ui.previous_preset = gr.State(selected.name)
                ui.description = gr.Markdown(selected.description, elem_id="preset-description")
            with gr.Accordion("Settings", open=True):
                ctx.add_fields(fields.TRAIN, per_row=3)
            # Open when the page's config trains an adapter, so that its settings are in sight.
            adapter = fields.get_value(ctx.raw, "network.type") != "full"
            with gr.Accordion("Network: full fine-tuning or a LoRA-family adapter", open=adapter,
                              elem_id="network-section"):
                ctx.add_fields(fields.NETWORK, per_row=4)
            with gr.Accordion("Advanced training options (augmentations: in the YAML, key augment)", open=False):
                ctx.add_fields(fields.ADVANCED, per_row=3)
            with gr.Accordion("Advanced: the whole config as YAML", open=False):
                ctx.yaml = gr.Code(configs.to_yaml(ctx.raw), language="yaml", lines=18, max_lines=40,
                                   interactive=True, label="config.yaml", elem_id="config-yaml")
            ctx.check = gr.Markdown(configs.check_message(ctx.raw), elem_id="config-check")
            with gr.Row():
                ui.start = gr.Button("Start", variant="primary", elem_id="start-button")
                ui.stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
                ui.vram = gr.Button("Estimate GPU memory", elem_id="vram-button")
            ui.message = gr.Markdown(elem_id="job-message")
            with gr.Row(equal_height=True):
                # A custom value is a run folder typed in, for runs outside the output folder.
                ui.resume_run = gr.Dropdown([], label="Previous runs", elem_id="resume-run", scale=4,
                                            allow_custom_value=True)
                ui.refresh = gr.Button("↻", elem_id="refresh-runs", scale=0, min_width=50)
                ui.resume = gr.Button("Resume", elem_id="resume-button", scale=1)
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
            ui.gallery = gr.Gallery(label="Samples", columns=6, height=200, object_fit="contain",
                                    elem_id="sample-gallery")
            ui.log = gr.Textbox(label="Log", lines=7, max_lines=7, autoscroll=True, interactive=False,
                                elem_id="train-log")
    return ui


def wire(ctx: PageContext, ui: SimpleNamespace, preset_list: list[presets.Preset]) -> None:
    by_name = {p.name: p for p in preset_list}
    actions = ctx.actions

    def choose_preset(name: str, previous: str, *values):
        preset = by_name[name]
        raw = preset_config(preset, by_name[previous], list(values), ctx.output_dir)
        return [name, preset.description, configs.to_yaml(raw), configs.check_message(raw),
                *fields.form_values(raw, fields.ALL)]

    ui.preset.input(choose_preset, [ui.preset, ui.previous_preset, *ctx.inputs],
                    [ui.previous_preset, ui.description, ctx.yaml, ctx.check, *ctx.inputs], api_visibility="private")

    (ui.start.click(sync_form, [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(actions.start_training, ctx.yaml, ui.message, api_name="start_training"))
    ui.stop.click(actions.stop, None, ui.message, api_name="stop_job")
    ui.resume.click(actions.resume_training, ui.resume_run, ui.message, api_name="resume_training")

    def refresh_runs(output_dir: str):
        return gr.update(choices=resume_choices(output_dir, ctx.manager.active_run_dir()))

    ui.refresh.click(refresh_runs, ctx.form["output_dir"], ui.resume_run, api_visibility="private")
    (ui.vram.click(sync_form, [ctx.yaml, *ctx.inputs], [ctx.yaml, ctx.check], api_visibility="private")
     .success(actions.estimate_vram, ctx.yaml, ui.message, api_visibility="private"))
