"""Time from `python app.py` to a served page (HTTP 200 on /), median of N starts.

    python bench/startup.py            # 3 starts
    python bench/startup.py --runs 5

Each start is a fresh process with an empty output folder; the page counts as served when GET / answers
200 (polled every 0.1 s). The OS file cache is warm after the first start, as on a user's second launch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scal_gui.testing import app_server  # noqa: E402


def measure_once() -> float:
    with tempfile.TemporaryDirectory(prefix="scal-bench-") as output:
        started = time.monotonic()
        with app_server("--output-dir", output, env={"GRADIO_ANALYTICS_ENABLED": "False"}):
            return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    times = []
    for run in range(args.runs):
        times.append(measure_once())
        print(f"start {run + 1}: {times[-1]:.2f} s", flush=True)
    print(f"median of {args.runs}: {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
