"""`CaptionJob`: captions every image of a dataset folder, batch by batch, and `python -m engine caption`.

The images are the files the dataset index counts as images (`data.listing`: masks `<stem>.mask.png` and hidden
files are not). An image whose `<stem>.txt` already holds a caption is left alone unless `overwrite`. Each
caption is `prefix`, the model's caption and `suffix`, the non-empty ones joined by ", ", written to a temporary
file and renamed over `<stem>.txt`, so that a caption file is always whole. A stop ends after the current batch.
An image that cannot be read is reported in the log and left without a caption.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import events
from ..data.caption_files import write_caption
from ..errors import UserError
from ..job import Job, release_memory
from .options import PREFIX, CaptionOptions

CAPTION_SUFFIX = ".txt"


def images_of(folder: Path) -> list[str]:
    """The names of the folder's images, sorted."""
    from ..data.listing import list_folder

    names = list_folder(str(folder), {"images": False})["images"]["names"]
    return sorted(os.fsdecode(name) for name in names)


def has_caption(image: Path) -> bool:
    caption = image.with_suffix(CAPTION_SUFFIX)
    try:
        return bool(caption.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def compose(prefix: str, caption: str, suffix: str) -> str:
    return ", ".join(part for part in (prefix.strip(), caption.strip(), suffix.strip()) if part)


def caption_image(image: Path, text: str) -> Path:
    target = image.with_suffix(CAPTION_SUFFIX)
    write_caption(target, text)
    return target


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB") if image.mode not in ("RGB", "RGBA") else image.copy()


class CaptionJob(Job):
    thread_name = "scal-sdt-caption"

    def __init__(self, options: CaptionOptions, event_queue=None, on_event=None, stop_event=None):
        super().__init__(event_queue, on_event, stop_event)
        self.options = options
        self.written: list[Path] = []

    def folder(self) -> Path:
        from .. import paths

        if not self.options.path:
            raise UserError(f"{PREFIX} option 'path': a folder of images is required")
        folder = Path(paths.resolve(self.options.path))
        if not folder.is_dir():
            raise UserError(f"{PREFIX} option 'path': not a folder: {folder}")
        if not os.access(folder, os.W_OK):
            raise UserError(f"{PREFIX} option 'path': {folder} is not writable")
        return folder

    def failure_context(self) -> str:
        return self.options.path

    def _run(self) -> events.Event:
        import torch

        from . import models

        options = self.options
        folder = self.folder()
        images = [folder / name for name in images_of(folder)]
        todo = [image for image in images if options.overwrite or not has_caption(image)]
        kept = len(images) - len(todo)
        summary = {"captioned": 0, "kept": kept, "unreadable": 0}
        if not todo:
            self.log(f"every image of {folder} has a caption: nothing to do")
            return events.Finished(run_dir=str(folder), summary=summary)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        captioner = models.load(options, device)
        self.log(f"captioning {len(todo)} images with {captioner.kind} on {device} ({kept} already captioned)")
        total, done = len(todo), 0
        started = time.perf_counter()
        self.emit(events.Progress(done=0, total=total))
        try:
            for begin in range(0, total, options.batch_size):
                if self.stop_requested:
                    break
                batch, pictures = [], []
                for image in todo[begin:begin + options.batch_size]:
                    try:
                        pictures.append(_open(image))
                        batch.append(image)
                    except OSError as error:
                        summary["unreadable"] += 1
                        self.log(f"{image.name} is not captioned: it cannot be read ({error})", level="warning")
                for image, caption in zip(batch, captioner.caption(pictures) if pictures else []):
                    self.written.append(caption_image(image, compose(options.prefix, caption, options.suffix)))
                summary["captioned"] += len(batch)
                done = min(begin + options.batch_size, total)
                elapsed = time.perf_counter() - started
                self.emit(events.Progress(done=done, total=total, eta_s=elapsed / done * (total - done)))
        finally:
            del captioner
            release_memory()
        return events.Finished(run_dir=str(folder), step=done, stopped=done < total, summary=summary)


def cmd_caption(args) -> int:
    from tqdm import tqdm

    bar = None

    def show(event: events.Event) -> None:
        nonlocal bar
        if isinstance(event, events.Log):
            tqdm.write(f"{event.level}: {event.message}", file=sys.stderr)
        elif isinstance(event, events.Progress):
            bar = bar or tqdm(total=event.total, unit="image", desc="captions", dynamic_ncols=True)
            bar.update(event.done - bar.n)

    options = CaptionOptions(model=args.model, path=args.path, overwrite=args.overwrite, prefix=args.prefix,
                             suffix=args.suffix, prompt=args.prompt, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, general_threshold=args.general_threshold,
                             character_threshold=args.character_threshold)
    job = CaptionJob(options, on_event=show)
    job.start()
    try:
        while job.thread.is_alive():
            job.join(0.5)
    except KeyboardInterrupt:
        tqdm.write("stopping after the current batch (Ctrl+C again to abort)", file=sys.stderr)
        job.stop()
        job.join()
    result = job.result
    if bar is not None:
        bar.close()
    if isinstance(result, events.Failed):
        if result.user_error:
            raise UserError(result.error)
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    summary = result.summary
    state = "stopped" if result.stopped else "finished"
    print(f"{state}: {summary['captioned']} captions written, {summary['kept']} kept, "
          f"{summary['unreadable']} unreadable images in {result.run_dir}")
    return 0


def register(commands) -> None:
    defaults = CaptionOptions()
    parser = commands.add_parser("caption", help="caption a dataset folder's images with a captioning model")
    parser.add_argument("--model", required=True, help="a model folder or Hugging Face Hub id: Qwen2.5-VL, "
                        "Qwen3-VL, Florence-2, JoyCaption (LLaVA) or a WD14 tagger")
    parser.add_argument("--path", required=True, help="the folder of images; captions go to <stem>.txt")
    parser.add_argument("--overwrite", action="store_true", help="replace existing non-empty captions")
    parser.add_argument("--prefix", default=defaults.prefix, help="put before each caption (a trigger word)")
    parser.add_argument("--suffix", default=defaults.suffix, help="put after each caption")
    parser.add_argument("--prompt", default=defaults.prompt,
                        help="the instruction (Florence-2: a task token); default: the model kind's own")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--general-threshold", type=float, default=defaults.general_threshold,
                        help="WD14 taggers: the least probability of a general tag")
    parser.add_argument("--character-threshold", type=float, default=defaults.character_threshold,
                        help="WD14 taggers: the least probability of a character tag")
    parser.set_defaults(func=cmd_caption)
