"""Taking a run's results home: the files of a run under the app's output folder that the page offers for
download (the newest checkpoint's adapter file, the converted files, metrics.jsonl, config.yaml) and the
samples as one zip built on demand in the app's cache.

Only files inside the app's output folder are offered: every path is resolved (symlinks too) and one that
lands outside is refused; a run is named as the output folder lists it (project/run_id), and a name that is
not one of those runs is refused. The output folder itself must be one the app's PathPolicy allows, and a file
(or samples zip) larger than the page's max_bytes is not offered.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import gradio as gr

from engine.errors import UserError
from engine.run_dir import CONFIG_FILE, RunDir

from . import runs
from .allowed import PathPolicy

ADAPTER_FILE = "adapter.safetensors"  # engine.models.kohya.ADAPTER_EXPORT, without importing the models
SAMPLE_SUFFIX = ".png"
DOWNLOADS = "downloads"  # the samples zips, under the app's cache
ZIP_CHUNK = 1 << 20


class Refused(Exception):
    """A run name or a file the page does not serve; its message is one line."""


@dataclass(frozen=True)
class RunFiles:
    """What a run offers, every path resolved and inside the output folder."""
    name: str                      # project/run_id
    path: Path
    adapter: Optional[Path]        # the newest checkpoint's adapter file (adapter runs)
    checkpoint: Optional[str]      # that checkpoint's name, step-N
    converted: tuple[Path, ...]
    samples: tuple[Path, ...]
    metrics: Optional[Path]
    config: Optional[Path]
    refused: tuple[str, ...] = ()  # one line per file left out for lying outside the output folder


def output_root(output_dir: Optional[str]) -> Path:
    """The app's output folder, resolved."""
    from engine import paths

    return Path(paths.resolve(output_dir or "output")).resolve()


def run_name(run_path: Path) -> str:
    """How the page names a run: project/run_id."""
    return f"{run_path.parent.name}/{run_path.name}"


def run_choices(output_dir: Optional[str], active: Optional[str] = None) -> list[tuple[str, str]]:
    """(label, project/run_id) of the output folder's runs, newest first."""
    try:
        found = runs.list_runs(str(output_root(output_dir)), active)
    except OSError:
        return []
    return [(run.label, run_name(run.path)) for run in found]


def inside(root: Path, path: Path) -> Path:
    """path resolved (symlinks too), or Refused when that lies outside root."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as error:
        raise Refused(f"Refused: {path} cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if not real.is_relative_to(root):
        raise Refused(f"Refused: {path} lies outside the output folder {root}")
    return real


def allowed_root(output_dir: Optional[str], policy: PathPolicy) -> Path:
    """output_root, or Refused when the policy does not allow it."""
    root = output_root(output_dir)
    try:
        policy.check("the output folder", str(root))
    except UserError as error:
        raise Refused(f"Refused: {error}") from None
    return root


def find_run(output_dir: Optional[str], name: str) -> Path:
    """The folder of the run named project/run_id under the output folder; Refused for any other name."""
    root = output_root(output_dir)
    text = str(name or "").strip()
    parts = text.split("/")
    if (len(parts) != 2 or any(part in ("", ".", "..") for part in parts) or "\\" in text or "\0" in text
            or os.path.isabs(text)):
        raise Refused(f"Refused: {text!r} is not a run of the output folder (a run is named project/run_id)")
    if not root.is_dir():
        raise Refused(f"Refused: the output folder {root} does not exist")
    for run in runs.list_runs(str(root)):
        if run_name(run.path) == text:
            return inside(root, run.path)
    raise Refused(f"Refused: {text!r} is not a run of the output folder {root}")


def _regular(root: Path, path: Path, refused: list[str], max_bytes: Optional[int] = None) -> Optional[Path]:
    """path resolved when it is a file inside root of at most max_bytes; None when missing, its refusal noted
    when outside or larger."""
    if not (path.is_file() or path.is_symlink()):
        return None
    try:
        real = inside(root, path)
    except Refused as error:
        refused.append(str(error))
        return None
    if not real.is_file():
        return None
    if max_bytes is not None and real.stat().st_size > max_bytes:
        refused.append(f"Refused: {path} is {size_text(real.stat().st_size)}, over the download limit of "
                       f"{size_text(max_bytes)} (--max-upload-mb)")
        return None
    return real


def run_files(output_dir: Optional[str], name: str, policy: PathPolicy = PathPolicy.local(),
              max_bytes: Optional[int] = None) -> RunFiles:
    """What the run named name offers; Refused when the name is not a run of the output folder, or the
    output folder is not one the policy allows. Files over max_bytes are left out with a refused line."""
    from engine.checkpoints import list_checkpoints

    root = allowed_root(output_dir, policy)
    path = find_run(output_dir, name)
    run = RunDir(path)
    refused: list[str] = []
    saved = list_checkpoints(path)
    adapter = _regular(root, saved[-1] / ADAPTER_FILE, refused, max_bytes) if saved else None
    converted = []
    if run.converted.is_dir():
        for entry in sorted(run.converted.iterdir()):
            if not entry.name.startswith(".") and (real := _regular(root, entry, refused, max_bytes)):
                converted.append(real)
    return RunFiles(name=name, path=path, adapter=adapter, checkpoint=saved[-1].name if saved else None,
                    converted=tuple(converted), samples=tuple(_samples(root, path, refused)),
                    metrics=_regular(root, run.metrics, refused, max_bytes),
                    config=_regular(root, path / CONFIG_FILE, refused, max_bytes), refused=tuple(refused))


def _samples(root: Path, run_path: Path, refused: list[str]) -> list[Path]:
    """The sample PNGs, samples/<step>/*.png, in step order (unresolved: the zip names them by their place)."""
    folder = run_path / "samples"
    found = []
    if folder.is_dir():
        for step in sorted(folder.iterdir()):
            if not step.is_dir():
                continue
            try:
                inside(root, step)
            except Refused as error:
                refused.append(str(error))
                continue
            for image in sorted(step.iterdir()):
                if image.suffix.lower() == SAMPLE_SUFFIX and _regular(root, image, refused):
                    found.append(image)
    return found


def downloads_dir() -> Path:
    from engine import paths

    folder = paths.cache_dir() / DOWNLOADS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def zip_samples(output_dir: Optional[str], name: str, policy: PathPolicy = PathPolicy.local(),
                max_bytes: Optional[int] = None) -> Optional[Path]:
    """The run's samples as one zip in the app's cache (samples/<step>/<file>.png inside), built now and
    streamed file by file; None when the run has no samples, Refused when they hold more than max_bytes.
    The zip replaces the run's previous one."""
    files = run_files(output_dir, name, policy, max_bytes)
    if not files.samples:
        return None
    total = sum(image.stat().st_size for image in files.samples)
    if max_bytes is not None and total > max_bytes:
        raise Refused(f"Refused: the samples hold {size_text(total)}, over the download limit of "
                      f"{size_text(max_bytes)} (--max-upload-mb)")
    root = output_root(output_dir)
    folder = downloads_dir()
    target = folder / f"{files.path.parent.name}-{files.path.name}-samples.zip"
    handle, temp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".zip.tmp", dir=folder)
    os.close(handle)
    try:
        # PNGs are compressed already: stored, not deflated again.
        with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for image in files.samples:
                real = inside(root, image)  # checked again: the folder may have changed since it was listed
                arcname = image.relative_to(files.path).as_posix()
                with open(real, "rb") as source, archive.open(zipfile.ZipInfo.from_file(real, arcname), "w",
                                                              force_zip64=True) as sink:
                    while chunk := source.read(ZIP_CHUNK):
                        sink.write(chunk)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


# -- the page ---------------------------------------------------------------------------------------------

_served: set = set()


def serve(path: Path) -> str:
    """Let the page serve this one file (gradio serves it in place, never the folder around it)."""
    text = str(path)
    if text not in _served:
        _served.add(text)
        gr.set_static_paths([text])
    return text


def summary(files: RunFiles) -> str:
    lines = [f"**{files.name}**: {len(files.samples)} sample images, {len(files.converted)} converted files."]
    if files.adapter is None:
        lines.append("No adapter file: " + ("the run has no checkpoint." if files.checkpoint is None else
                                            f"{files.checkpoint} holds none (a full fine-tune: convert its "
                                            "checkpoint on the Convert tab)."))
    lines.extend(files.refused)
    return "\n\n".join(lines)


def build(ctx) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Accordion("Results: download a run's files", open=False, elem_id="results"):
        with gr.Row(equal_height=True):
            ui.run = gr.Dropdown([], label="Run", elem_id="results-run", scale=4)
            ui.refresh = gr.Button("↻", elem_id="results-refresh", scale=0, min_width=50)
        ui.message = gr.Markdown(elem_id="results-message")
        with gr.Row():
            ui.adapter = gr.DownloadButton("Adapter file", visible=False, elem_id="download-adapter")
            ui.metrics = gr.DownloadButton("metrics.jsonl", visible=False, elem_id="download-metrics")
            ui.config = gr.DownloadButton("config.yaml", visible=False, elem_id="download-config")
            ui.zip = gr.Button("Zip the samples", visible=False, elem_id="zip-samples")
            ui.samples = gr.DownloadButton("Samples (zip)", visible=False, elem_id="download-samples")
        ui.converted = gr.File(label="Converted files", file_count="multiple", interactive=False, visible=False,
                               elem_id="download-converted")
    return ui


def _button(path: Optional[Path], label: str):
    if path is None:
        return gr.update(value=None, visible=False)
    return gr.update(value=serve(path), label=label, visible=True)


def show(output_dir: Optional[str], name: Optional[str], policy: PathPolicy = PathPolicy.local(),
         max_bytes: Optional[int] = None) -> list:
    """[message, adapter, metrics, config, zip button, samples zip, converted] for the chosen run."""
    hidden = [gr.update(value=None, visible=False)] * 3 + [gr.update(visible=False),
                                                           gr.update(value=None, visible=False),
                                                           gr.update(value=None, visible=False)]
    if not name:
        return ["", *hidden]
    try:
        files = run_files(output_dir, name, policy, max_bytes)
    except Refused as error:
        return [str(error), *hidden]
    except OSError as error:
        return [f"Error: {error}", *hidden]
    adapter_label = f"Adapter file ({files.checkpoint})" if files.adapter else "Adapter file"
    return [summary(files), _button(files.adapter, adapter_label), _button(files.metrics, "metrics.jsonl"),
            _button(files.config, "config.yaml"),
            gr.update(visible=bool(files.samples), value=f"Zip the {len(files.samples)} samples"),
            gr.update(value=None, visible=False),
            gr.update(value=[serve(p) for p in files.converted] or None, visible=bool(files.converted))]


def make_zip(output_dir: Optional[str], name: Optional[str], policy: PathPolicy = PathPolicy.local(),
             max_bytes: Optional[int] = None) -> list:
    """[message, samples zip button]."""
    try:
        target = zip_samples(output_dir, name or "", policy, max_bytes)
    except Refused as error:
        return [str(error), gr.update(value=None, visible=False)]
    except OSError as error:
        return [f"Error: the samples zip: {error}", gr.update(value=None, visible=False)]
    if target is None:
        return ["The run has no samples.", gr.update(value=None, visible=False)]
    return [gr.skip(), gr.update(value=serve(target), visible=True,
                                 label=f"Samples (zip, {size_text(target.stat().st_size)})")]


def size_text(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


def wire(ctx, ui: SimpleNamespace, page: gr.Blocks) -> None:
    # The app's output folder, fixed when the page is built: the form's output_dir may name any folder.
    from . import fields

    output_dir = ctx.output_dir or fields.get_value(ctx.raw, "output_dir")
    limits = (ctx.policy, ctx.max_upload_bytes)

    def refresh():
        choices = run_choices(output_dir, ctx.manager.active_run_dir())
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    outputs = [ui.message, ui.adapter, ui.metrics, ui.config, ui.zip, ui.samples, ui.converted]
    (page.load(refresh, None, ui.run, api_visibility="private")
     .then(lambda name: show(output_dir, name, *limits), ui.run, outputs, api_visibility="private"))
    (ui.refresh.click(refresh, None, ui.run, api_visibility="private")
     .then(lambda name: show(output_dir, name, *limits), ui.run, outputs, api_visibility="private"))
    ui.run.input(lambda name: show(output_dir, name, *limits), ui.run, outputs, api_visibility="private")
    ui.zip.click(lambda name: make_zip(output_dir, name, *limits), ui.run, [ui.message, ui.samples],
                 api_visibility="private")
