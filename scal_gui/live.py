"""What the page shows of a job's history: status line, progress bar, curves, images, log, and the message
that says how the job ended."""
from __future__ import annotations

import html
from typing import Optional

from . import charts
from .jobs import History

STATE_WORDS = {"starting": "Starting", "running": "Running", "stopping": "Stopping", "finished": "Finished",
               "stopped": "Stopped", "failed": "Failed", "abandoned": "Abandoned"}
# The final states whose error line says why (an abandoned job did not stop within jobs.STOP_BOUND_S).
EXPLAINED = ("failed", "abandoned")


def status_line(history: Optional[History], idle: str) -> str:
    if history is None:
        return idle
    line = f"**{STATE_WORDS[history.state]}** {history.label}"
    if history.run_dir:
        line += f" — `{history.run_dir}`"
    if history.state in EXPLAINED:
        first = history.error.strip().splitlines()[0] if history.error.strip() else "unknown error"
        line += f"\n\nError: {first}"
    return line


def outcome(history: History) -> str:
    """The message that replaces "Started …" or "Stopping …" once the job has ended."""
    where = f" at step {history.step}" if history.kind == "train" else ""
    if history.state in EXPLAINED:
        first = history.error.strip().splitlines()[0] if history.error.strip() else "unknown error"
        return f"**{STATE_WORDS[history.state]}** {history.label}{where}: {first}"
    return f"**{STATE_WORDS[history.state]}** {history.label}{where}."


# How the actions' messages begin while the job they name has not ended yet.
PENDING_PREFIXES = ("Started", "Stopping")


def settled_message(message: str, history: Optional[History]) -> Optional[str]:
    """The outcome where message still says a job was started or is stopping but that job has ended, else
    None (the message stands: a refusal, an estimate, or a job still going)."""
    if history is None or history.active or not (message or "").startswith(PENDING_PREFIXES):
        return None
    return outcome(history)


def _bar(fraction: float, text: str, state: str) -> str:
    percent = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="scal-progress" data-state="{state}">'
            f'<div class="scal-progress-track"><div class="scal-progress-fill" style="width:{percent:.1f}%"></div>'
            f'</div><div class="scal-progress-text">{html.escape(text)}</div></div>')


def train_progress(history: Optional[History]) -> str:
    if history is None:
        return _bar(0, "no run yet", "idle")
    if history.active and history.step == 0 and history.total and history.done < history.total:
        # a DreamBooth run first generates its missing class images
        parts = [f"class images {history.done} / {history.total}"]
        if history.eta_s:
            parts.append(f"ETA {charts.duration(history.eta_s)}")
        return _bar(history.done / history.total, " · ".join(parts), history.state)
    total = history.total_steps or 0
    parts = [f"step {history.step}" + (f" / {total}" if total else ""), f"epoch {history.epoch}"]
    if history.it_per_s:
        parts.append(f"{history.it_per_s:.2f} it/s")
    if history.active and history.eta_s:
        parts.append(f"ETA {charts.duration(history.eta_s)}")
    return _bar(history.step / total if total else 0, " · ".join(parts), history.state)


def image_progress(history: Optional[History], idle: str) -> str:
    """The bar of a job counted in images (class images generated, images captioned)."""
    if history is None:
        return _bar(0, idle, "idle")
    parts = [f"{history.done} / {history.total} images" if history.total else STATE_WORDS[history.state].lower()]
    if history.active and history.eta_s:
        parts.append(f"ETA {charts.duration(history.eta_s)}")
    return _bar(history.done / history.total if history.total else 0, " · ".join(parts), history.state)


def sample_gallery(history: Optional[History]) -> list:
    if history is None:
        return []
    return [(path, f"step {step}") for step, path in history.samples]


def log_text(history: Optional[History]) -> str:
    if history is None:
        return ""
    text = "\n".join(history.logs)
    if history.state == "failed" and "\n" in history.error.strip():
        text += "\n" + history.error  # the whole traceback of an engine fault belongs in the log
    return text


# The live view (#live-view) stays in sight while the Train tab's long settings column scrolls: sticky,
# and no taller than the window. The page container clips rather than hides its overflow, because an
# element with overflow: hidden becomes the scroll box of the sticky column, and it never scrolls.
CSS = """
.scal-progress-track { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.scal-progress-fill { height: 100%; background: var(--color-accent); transition: width 0.4s; }
.scal-progress[data-state="failed"] .scal-progress-fill { background: var(--error-text-color); }
.scal-progress-text { margin-top: 4px; font-variant-numeric: tabular-nums; }
.gradio-container { overflow: clip !important; }
#live-view { position: sticky; top: 0; align-self: flex-start; max-height: 100vh; overflow-y: auto; }
"""
