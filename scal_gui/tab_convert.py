"""The Convert tab: a run's checkpoint (or any model folder) to one .safetensors/.ckpt file; an adapter
run's checkpoint to its adapter file, the merged model or a diffusers LoRA."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import gradio as gr

from engine import config as schema
from engine.errors import UserError
from engine.run_dir import RunDir

from . import convert_options, results, runs
from .allowed import PathPolicy
from .context import PageContext

LABELS = {"text_encoder": "Include the text encoder", "vae": "Include the VAE", "ema": "Use the EMA UNet",
          "overwrite": "Replace an existing file", "unet_dtype": "UNet weights", "vae_dtype": "VAE weights",
          "text_encoder_dtype": "Text encoder weights", "fmt": "Format",
          "adapter_output": "An adapter run's checkpoint becomes"}
INFO = {"adapter_output": "a full fine-tune's is always one model file"}
# The converter's messages name its command-line flags; the page names its own checkbox instead.
FLAG_WORDS = {"pass --overwrite": f'tick "{LABELS["overwrite"]}"'}


def convert_and_report(actions, source: str, out: str, values: list, progress) -> str:
    """Convert as the form says, reporting progress; the result, then each warning of the converter (what a
    DoRA file's readers cannot apply, a v-prediction model's config) as its own paragraph."""
    warnings: list[str] = []

    def on_event(event):
        if event.kind == "progress" and event.total:
            progress((event.done, event.total), desc="converting")
        elif event.kind == "log" and event.level == "warning":
            warnings.append(event.message)

    result = actions.convert(source, out, convert_options.to_kwargs(values), on_event)
    for flag, words in FLAG_WORDS.items():
        result = result.replace(flag, words)
    return "\n\n".join([result, *warnings])


def checkpoint_choices(output_dir: str, active: Optional[str] = None,
                       policy: PathPolicy = PathPolicy.local()) -> list[tuple[str, str]]:
    """The checkpoints of the output folder's runs; none when the policy does not allow the folder."""
    try:
        policy.check("config key 'output_dir'", output_dir or schema.Config().output_dir)
        return runs.checkpoints(runs.list_runs(output_dir, active))
    except (OSError, UserError):
        return []


def build(ctx: PageContext) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row(equal_height=True):
        ui.checkpoint = gr.Dropdown([], label="Checkpoint of a run", elem_id="convert-checkpoint", scale=4)
        ui.refresh = gr.Button("↻", scale=0, min_width=50, elem_id="convert-refresh")
    ui.source = gr.Textbox(label="Checkpoint, run folder or diffusers model folder", elem_id="convert-source")
    ui.out = gr.Textbox(label="Output .safetensors/.ckpt file, or a folder for a file named after the checkpoint",
                        elem_id="convert-out")
    # Values and choices arrive with the page load: reading them imports the converter, and torch with it.
    ui.options = []
    with gr.Row():
        for name in convert_options.CHECKBOXES:
            ui.options.append(gr.Checkbox(label=LABELS[name], elem_id=f"convert-{name}"))
    with gr.Row():
        for name in convert_options.ORDER[len(convert_options.CHECKBOXES):]:
            # Custom values let API clients pass a choice the page has not loaded; the converter checks it.
            ui.options.append(gr.Dropdown([], label=LABELS[name], info=INFO.get(name), elem_id=f"convert-{name}",
                                          allow_custom_value=True))
    with gr.Row():
        ui.convert = gr.Button("Convert", variant="primary", elem_id="convert-button")
        # in turn, behind the jobs running or queued, rather than now beside them
        ui.enqueue = gr.Button("Add to queue", elem_id="convert-queue-button")
    ui.result = gr.Markdown(elem_id="convert-result")
    # a run's files to take home sit beside what converting makes of them
    ui.results = results.build(ctx)
    return ui


def wire(ctx: PageContext, ui: SimpleNamespace, page: gr.Blocks) -> None:
    def option_updates():
        return [gr.update(value=default, choices=choices) if choices else gr.update(value=default)
                for default, choices in convert_options.defaults().values()]

    page.load(option_updates, None, ui.options, api_visibility="private")
    results.wire(ctx, ui.results, page)

    def refresh(output_dir: str):
        return gr.update(choices=checkpoint_choices(output_dir, ctx.manager.active_run_dir(), ctx.policy))

    page.load(refresh, ctx.form["output_dir"], ui.checkpoint, api_visibility="private")
    ui.refresh.click(refresh, ctx.form["output_dir"], ui.checkpoint, api_visibility="private")

    def pick(checkpoint: str):
        # A folder as output: the converter names the file after the run and the step.
        return checkpoint, str(RunDir(Path(checkpoint).parent.parent).converted)

    ui.checkpoint.input(pick, ui.checkpoint, [ui.source, ui.out], api_visibility="private")

    def run(source: str, out: str, *values, progress=gr.Progress()):
        return convert_and_report(ctx.actions, source, out, list(values), progress)

    ui.convert.click(run, [ui.source, ui.out, *ui.options], ui.result, api_name="convert")

    def enqueue(source: str, out: str, *values):
        return ctx.actions.queue_conversion(source, out, convert_options.to_kwargs(list(values)))

    ui.enqueue.click(enqueue, [ui.source, ui.out, *ui.options], ui.result, api_name="queue_conversion")
