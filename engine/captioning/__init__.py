"""Captioning a dataset folder with a local vision-language model or a WD14 tagger.

`options` (the typed options), `models` (which kind of captioner a folder holds; the transformers ones),
`tagger` (WD14-style ONNX taggers), `job` (`CaptionJob` and `python -m engine caption`).
"""
from .job import CaptionJob
from .options import CaptionOptions

__all__ = ["CaptionJob", "CaptionOptions"]
