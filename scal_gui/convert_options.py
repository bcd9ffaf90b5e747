"""The converter's options as the Convert tab offers them: defaults from its signature, choices from the
engine's tables of dtypes, formats and adapter outputs."""
from __future__ import annotations

import inspect

AUTO_FORMAT = "from the output name"
CHECKBOXES = ("text_encoder", "vae", "ema", "overwrite")
DTYPE_OPTIONS = ("unet_dtype", "vae_dtype", "text_encoder_dtype")
ORDER = CHECKBOXES + DTYPE_OPTIONS + ("fmt", "adapter_output")
# How the page names what an adapter run's checkpoint becomes (the engine's ADAPTER_OUTPUTS keys).
ADAPTER_LABELS = {"kohya": "kohya/LyCORIS adapter file", "merged": "merged into the base model (one model file)",
                  "diffusers": "diffusers LoRA folder"}


def defaults() -> dict[str, tuple[object, list]]:
    """option -> (default shown in the form, choices; [] for a checkbox). A choice is a value, or a
    (label, value) pair where the page shows a label."""
    from engine.models import convert  # imports torch: loaded with the page's first request, not at startup

    parameters = inspect.signature(convert.convert_checkpoint).parameters
    result: dict[str, tuple[object, list]] = {name: (parameters[name].default, []) for name in CHECKBOXES}
    for name in DTYPE_OPTIONS:
        result[name] = (parameters[name].default, list(convert.DTYPES))
    fmt = parameters["fmt"].default
    result["fmt"] = (AUTO_FORMAT if fmt is None else fmt, [AUTO_FORMAT, *convert.FORMATS.values()])
    result["adapter_output"] = (parameters["adapter_output"].default,
                                [(ADAPTER_LABELS.get(kind, kind), kind) for kind in convert.ADAPTER_OUTPUTS])
    return result


def to_kwargs(values: list) -> dict:
    """convert_checkpoint's keyword arguments from the form's values in ORDER."""
    kwargs = dict(zip(ORDER, values, strict=True))
    kwargs["fmt"] = None if kwargs["fmt"] == AUTO_FORMAT else kwargs["fmt"]
    if not kwargs["adapter_output"]:
        # An API client written before the option existed sends nothing for it: the converter's default.
        kwargs["adapter_output"] = defaults()["adapter_output"][0]
    return kwargs
