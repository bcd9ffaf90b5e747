"""A caption file written whole, by the captioner and by the app's caption editor alike: UTF-8 with one
newline at the end, through a hidden file in the same folder renamed over the caption, so a reader sees the
old caption or the new one, and a caption file that is a link is replaced rather than written through."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_caption(target: Path, text: str) -> None:
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")  # hidden: never listed as a caption
    try:
        staging.write_text(text + "\n", encoding="utf-8")
        os.replace(staging, target)
    finally:
        if staging.exists():
            staging.unlink()
