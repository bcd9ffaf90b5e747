"""The converter's options as the Convert tab offers them: defaults from its signature, choices from the
engine's tables of dtypes and formats."""
from __future__ import annotations

import inspect

AUTO_FORMAT = "from the output name"
CHECKBOXES = ("text_encoder", "vae", "ema", "overwrite")
DTYPE_OPTIONS = ("unet_dtype", "vae_dtype", "text_encoder_dtype")
ORDER = CHECKBOXES + DTYPE_OPTIONS + ("fmt",)


def defaults() -> dict[str, tuple[object, list]]:
    """option -> (default shown in the form, choices; [] for a checkbox)."""
    from engine.models import convert  # imports torch: loaded with the page's first request, not at startup

    parameters = inspect.signature(convert.convert_checkpoint).parameters
    result: dict[str, tuple[object, list]] = {name: (parameters[name].default, []) for name in CHECKBOXES}
    for name in DTYPE_OPTIONS:
        result[name] = (parameters[name].default, list(convert.DTYPES))
    fmt = parameters["fmt"].default
    result["fmt"] = (AUTO_FORMAT if fmt is None else fmt, [AUTO_FORMAT, *convert.FORMATS.values()])
    return result


def to_kwargs(values: list) -> dict:
    """convert_checkpoint's keyword arguments from the form's values in ORDER."""
    kwargs = dict(zip(ORDER, values, strict=True))
    kwargs["fmt"] = None if kwargs["fmt"] == AUTO_FORMAT else kwargs["fmt"]
    return kwargs
