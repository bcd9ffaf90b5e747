"""The options of a captioning job: every default and range once, checked when the options are made."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from ..config import AT_LEAST_1, UNIT, Range, check_fields

PREFIX = "caption"  # errors name an option as `caption.<field>`


@dataclass
class CaptionOptions:
    model: str = ""  # a local folder or a Hugging Face Hub id (org/name[@revision])
    path: str = ""  # the dataset folder: images with <stem>.txt captions beside them
    overwrite: bool = False  # replace non-empty captions too
    prefix: str = ""  # put before each caption (a trigger word), joined with ", "
    suffix: str = ""  # put after each caption, joined with ", "
    prompt: str = ""  # the instruction (Florence-2: the task token); empty: the model kind's own
    batch_size: Annotated[int, AT_LEAST_1] = 4
    max_new_tokens: Annotated[int, Range(1, 4096)] = 256
    general_threshold: Annotated[float, UNIT] = 0.35  # WD14 taggers: the least probability of a general tag
    character_threshold: Annotated[float, UNIT] = 0.85  # WD14 taggers: of a character tag

    def __post_init__(self) -> None:
        check_fields(self, PREFIX)
