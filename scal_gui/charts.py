"""Plot data for the loss and learning-rate curves, and the progress line."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd

MAX_POINTS = 1000  # per series: more points than pixels only slows the browser down
SMOOTHING = 0.9


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased so the first values are not pulled towards zero."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def _thin(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame) <= MAX_POINTS:
        return frame
    stride = math.ceil(len(frame) / MAX_POINTS)
    keep = frame.iloc[::stride]
    return pd.concat([keep, frame.iloc[[-1]]]) if keep.index[-1] != frame.index[-1] else keep


def loss_frame(points: list[dict], validation: Sequence[dict] = ()) -> Optional[pd.DataFrame]:
    """Columns step, loss, series ('raw', 'smoothed' and, with validation rounds, 'validation'); None (an
    empty plot) before the first step."""
    if not points:
        return None
    steps = [p["step"] for p in points]
    raw = [p["loss"] for p in points]
    frames = [_thin(pd.DataFrame({"step": steps, "loss": values, "series": name}))
              for name, values in (("raw", raw), ("smoothed", smooth(raw)))]
    if validation:
        frames.append(_thin(pd.DataFrame({"step": [v["step"] for v in validation],
                                          "loss": [v["loss"] for v in validation], "series": "validation"})))
    return pd.concat(frames, ignore_index=True)


def lr_frame(points: list[dict]) -> Optional[pd.DataFrame]:
    if not points:
        return None
    frame = pd.DataFrame({"step": [p["step"] for p in points], "lr": [p["lr"] for p in points]})
    return _thin(frame)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
