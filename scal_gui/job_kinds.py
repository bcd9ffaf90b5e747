"""The app's jobs, each built from what describes it (a config's YAML, a run folder, a conversion's paths and
options): for the tabs' buttons, and as the run queue's kinds, whose entries keep that description on disk.

A builder here returns build(event_queue) -> job for JobManager.start; the engine loads inside it. Another
kind of job joins the queue with one entry in KINDS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine import config as schema
from engine.errors import UserError

from . import configs, multi_device
from .allowed import PathPolicy
from .jobs import CAPTION, CLASSGEN, CONVERT, TRAIN
from .run_queue import Entry, QueueKind

NO_CLASS_FOLDER = "Set a class folder on the Dataset tab first."


def load_config(yaml_text: str) -> schema.Config:
    """The config of the editor's text; raises ConfigError naming the key or line."""
    config, _ = configs.load(configs.parse_yaml(yaml_text))
    return config


def class_generation_config(yaml_text: str) -> schema.Config:
    """The config for generating the first concept's class images; raises ConfigError, or UserError when that
    concept has no class folder."""
    config = load_config(yaml_text)
    concepts = config.data.concepts
    if not concepts or concepts[0].class_set is None or not concepts[0].class_set.path:
        raise UserError(NO_CLASS_FOLDER)
    # Generate is an explicit request: it applies to the first concept whatever the config says.
    concepts[0].class_set.auto_generate.enabled = True
    return config


def train_builder(config: schema.Config) -> Callable:
    def build(events):
        from engine import distributed

        processes = distributed.process_count(config.trainer.devices)
        if processes > 1:
            return multi_device.torchrun_training(events, processes, config)
        from engine.train import Trainer

        return Trainer(config, events)

    return build


def resume_builder(run_dir: str, policy: PathPolicy = PathPolicy.local()) -> Callable:
    def build(events):
        from engine import distributed
        from engine.train import Trainer

        trainer = Trainer.for_resume(run_dir, events)  # checks that run_dir is a run folder
        policy.check_config(trainer.config)  # the run may have been started by an app that allowed more
        processes = distributed.process_count(trainer.config.trainer.devices)
        if processes > 1:
            return multi_device.torchrun_training(events, processes, trainer.config, resume_dir=run_dir)
        return trainer

    return build


def classgen_builder(config: schema.Config) -> Callable:
    def build(events):
        from engine.classgen import ClassGenJob

        return ClassGenJob(config, events)

    return build


def convert_builder(source: str, out: str, options: dict) -> Callable:
    def build(events):
        from engine.convert_job import ConvertJob

        return ConvertJob(source, out, options, events)

    return build


def caption_builder(options) -> Callable:
    """options: engine.captioning.CaptionOptions."""
    def build(events):
        from engine.captioning import CaptionJob

        return CaptionJob(options, events)

    return build


def caption_options(spec: dict):
    """The captioning options an entry keeps; raises UserError for a value out of range."""
    from engine.captioning import CaptionOptions

    return CaptionOptions(**spec)


# -- the run queue's kinds: an entry's spec -> its builder -------------------------------------------------
# An entry's paths were checked against the app's policy when it was added.
def _queued_training(entry: Entry) -> Callable:
    """A run that an app restart cut off resumes from its newest intact checkpoint; one that saved none starts
    again from its config (in a new run folder)."""
    if entry.run_dir and Path(entry.run_dir).is_dir():
        from engine import checkpoints

        if checkpoints.newest_intact(Path(entry.run_dir)) is not None:
            return resume_builder(entry.run_dir)
    return train_builder(load_config(entry.spec["yaml"]))


KINDS = {
    "train": QueueKind(TRAIN, _queued_training),
    "resume": QueueKind(TRAIN, lambda entry: resume_builder(entry.spec["run_dir"])),
    "classgen": QueueKind(CLASSGEN, lambda entry: classgen_builder(class_generation_config(entry.spec["yaml"]))),
    "convert": QueueKind(CONVERT, lambda entry: convert_builder(entry.spec["source"], entry.spec["out"],
                                                                entry.spec["options"])),
    "caption": QueueKind(CAPTION, lambda entry: caption_builder(caption_options(entry.spec["options"]))),
}
