"""Engine features that live in their own modules; the app still starts when one is missing."""
from __future__ import annotations

import importlib.util


def available(name: str) -> bool:
    """Whether engine.<name> exists, found without importing it (imports may pull in torch)."""
    return importlib.util.find_spec(f"engine.{name}") is not None


def not_available(what: str) -> str:
    return f"{what} is not available yet in this version of the engine."
