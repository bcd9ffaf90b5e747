"""`python -m engine COMMAND`: the command line. User mistakes print one line and exit 2, no traceback."""
from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import time
import warnings

# How long a torchrun rank other than the first waits, after a config error, for torchrun to end it.
OTHER_RANKS_WAIT_S = 30.0


def _quiet_libraries() -> None:
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def cmd_train(args) -> int:
    from .config import load
    from .distributed import world_size_from_environment
    from .plan import refuse_for_processes
    from .train import Trainer

    is_main = int(os.environ.get("RANK", 0)) == 0
    interactive = is_main and not args.json_events
    # Under torchrun each rank is sent a Ctrl+C twice (by the terminal or the app, then by torchrun): only a
    # single process can tell a second press from the first. A press while the models load stops the run
    # as soon as it starts.
    interrupts = _Interrupts(announce=interactive,
                             abort_on_second=interactive and world_size_from_environment() == 1)
    signal.signal(signal.SIGINT, interrupts.note)
    if args.resume:
        trainer = Trainer.for_resume(args.resume, queue.Queue(), overrides=args.set)
    else:
        trainer = Trainer(load(args.config, args.set), queue.Queue())
    # Refused here, before the ranks start their work, as well as by the trainer itself.
    refuse_for_processes(trainer.config, world_size_from_environment())
    trainer.start()
    if not interactive:
        return _relay_events(trainer, interrupts, as_json=args.json_events and is_main)
    try:
        return _show_progress(trainer, interrupts)
    except KeyboardInterrupt:
        print("aborted: the newest checkpoint on disk is kept", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Now, without finalizing the interpreter under the training thread's native code (which aborts).
        os._exit(130)


class _Interrupts:
    """Ctrl+C (SIGINT, also the app's Stop) noted by a handler and acted on by the loop reading the run's
    events. An exception raised wherever that loop happens to be could leave the event queue's lock held,
    and the training thread would hang at its next event. Only an abort raises, and it ends the process."""

    def __init__(self, announce: bool, abort_on_second: bool):
        self.count = 0
        self.announce = announce  # say on stderr that the run is stopping
        self.abort_on_second = abort_on_second

    def note(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1 and self.abort_on_second:
            raise KeyboardInterrupt


def _events_until_done(trainer, interrupts: _Interrupts):
    """The job's events as they come, up to and including its Finished or Failed event; after a Ctrl+C
    the run stops after its current step and saves a checkpoint, whose events still come."""
    from . import events

    stopping = False
    while True:
        if interrupts.count and not stopping:
            stopping = True
            if interrupts.announce:
                from tqdm import tqdm  # a line of its own below the progress bar

                again = " (Ctrl+C again to abort)" if interrupts.abort_on_second else ""
                tqdm.write(f"stopping: saving a checkpoint{again}", file=sys.stderr)
            trainer.stop(save_checkpoint=True)
        try:
            event = trainer.events.get(timeout=0.5)
        except queue.Empty:
            continue
        yield event
        if isinstance(event, (events.Finished, events.Failed)):
            return


def _exit_code(event) -> int:
    from . import events

    if isinstance(event, events.Failed):
        return 2 if event.user_error else 1
    return 0


def _show_progress(trainer, interrupts: _Interrupts) -> int:
    """A progress bar of the class images generated first, if any; then one with the loss (and the newest
    val_loss), and one line per checkpoint, sample batch and log message."""
    from tqdm import tqdm

    from . import events

    bar = None
    generating = None  # the class images a run generates before it trains
    say = print
    shown = {}  # the newest val_loss stays on the bar between validation rounds
    for event in _events_until_done(trainer, interrupts):
        if isinstance(event, events.Progress):
            if generating is None:
                generating = tqdm(total=event.total, unit="image", desc="class images", dynamic_ncols=True)
                say = tqdm.write
            generating.update(event.done - generating.n)
        elif isinstance(event, events.Started):
            if generating is not None:
                generating.close()
            bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True)
            say = tqdm.write
            say(f"run folder: {event.run_dir}")
        elif isinstance(event, events.Step) and bar is not None:
            bar.update(event.step - bar.n)
            bar.set_postfix(epoch=event.epoch, loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", **shown)
        elif isinstance(event, events.Validation):
            shown["val_loss"] = f"{event.loss:.4f}"
        elif isinstance(event, events.Log):
            say(f"{event.level}: {event.message}", file=sys.stderr)
        elif isinstance(event, events.CheckpointSaved):
            say(f"checkpoint: {event.path}")
        elif isinstance(event, events.Sample):
            say(f"samples: {len(event.paths)} at step {event.step}")
        elif isinstance(event, events.Finished):
            if bar:
                bar.close()
            summary = event.summary or {}
            state = "stopped" if event.stopped else "finished"
            print(f"{state} at step {event.step}: {event.run_dir} "
                  f"({summary.get('images', 0)} images, {summary.get('skipped', 0)} skipped)")
            for item in summary.get("skipped_reasons", []):
                print(f"  skipped {item['path']}: {item['reason']}")
        elif isinstance(event, events.Failed):
            if bar:
                bar.close()
            print(f"error: {event.error}", file=sys.stderr)
    return _exit_code(event)


def _relay_events(trainer, interrupts: _Interrupts, as_json: bool) -> int:
    """For other programs (the app runs multi-GPU training as a child process) and for ranks other than 0:
    one JSON object per event on stdout, or nothing but the final error."""
    import json

    from . import events

    try:
        for event in _events_until_done(trainer, interrupts):
            if as_json:
                print(json.dumps(event.to_dict()), flush=True)
            elif isinstance(event, events.Failed):
                print(f"error: {event.error}", file=sys.stderr)
        return _exit_code(event)
    except BrokenPipeError:
        # The program reading the events has gone (the app was killed): the run stops as Stop would, with a
        # checkpoint, so that it frees its run folder for the restarted app to resume instead of training on
        # unseen. What it would still print goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        trainer.stop(save_checkpoint=True)
        return _relay_events(trainer, interrupts, as_json=False)


def cmd_make_tiny_model(args) -> int:
    from .models import tiny_captioners
    from .models.tiny import make_tiny_model

    if args.arch in tiny_captioners.ARCHITECTURES:
        print(tiny_captioners.make_tiny_captioner(args.dir, args.arch, seed=args.seed))
    else:
        print(make_tiny_model(args.dir, seed=args.seed, arch=args.arch))
    return 0


def cmd_make_sample_data(args) -> int:
    from .models.tiny import make_sample_data

    print(make_sample_data(args.dir, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import add_overrides_argument
    from .models.tiny_captioners import ARCHITECTURES as CAPTIONERS

    parser = argparse.ArgumentParser(prog="python -m engine", description="SCAL-SDT training engine")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a config")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config file")
    add_overrides_argument(train, "trainer.max_steps=10")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    train.add_argument("--json-events", action="store_true",
                       help="print each event as one JSON object per line instead of a progress bar")
    train.set_defaults(func=cmd_train)

    tiny = commands.add_parser("make-tiny-model", help="write the tiny offline demo pipeline")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--arch", choices=("sd", "sd21", "sdxl", "flux", "flux-schnell", "chroma", "z-image",
                                         "qwen-image", "qwen-image-edit", "flux2-klein", *CAPTIONERS),
                      default="sd", help="shrunk SD1.5 (default), SD2.1 768 v-prediction, SDXL, FLUX.1-dev, "
                                         "FLUX.1-schnell, Chroma1-HD, Z-Image-Turbo, Qwen-Image, Qwen-Image-Edit-2509 "
                                         "or FLUX.2 [klein] 4B; or a captioning model: "
                                         + ", ".join(CAPTIONERS))
    tiny.set_defaults(func=cmd_make_tiny_model)

    sample = commands.add_parser("make-sample-data", help="write the synthetic demo dataset")
    sample.add_argument("dir")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_make_sample_data)

    from .data import buckets_cli, cache_cli, make_shards
    from . import classgen, memory_plan, vram
    from .captioning import job as caption
    from .models import convert

    # Commands defined next to the code they drive; each module adds its own subcommand.
    for module in (buckets_cli, caption, cache_cli, classgen, convert, make_shards, memory_plan, vram):
        module.register(commands)
    return parser


def main(argv=None) -> int:
    from . import allocator
    from .config import ConfigError
    from .errors import UserError

    allocator.keep_freed_memory()  # before any thread starts: see engine.allocator
    _quiet_libraries()
    warnings.formatwarning = _format_warning
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        # Every torchrun rank reads the same config, so the first rank reports it. The others wait to be
        # ended: torchrun stops every rank as soon as one exits, which could cut the report off.
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr)
        else:
            time.sleep(OTHER_RANKS_WAIT_S)
        return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
