"""AdamW's step on the CPU: torch's per-parameter loop, its foreach form and its fused kernel (which
engine.optim picks where every parameter's device has it).

    python bench/optimizer_step.py [--rounds 3] [--threads 2]

Parameters shaped like a UNet's (60 of 1280x1280, 60 of 640x640, 20 3x3 convolutions of 320 channels, 300
vectors: 141.7 M values) with random gradients; AdamW (lr 1e-4, weight decay 1e-2); the three forms alternate
(A B C A B C), each timed over 5 steps after one untimed step that creates its state. Reported: seconds per step,
median over the rounds, and the largest difference of a parameter from the loop's after 20 steps of one seed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(1280, 1280)] * 60 + [(640, 640)] * 60 + [(320, 320, 3, 3)] * 20 + [(1280,)] * 300
FORMS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_time(form: str) -> float:
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **FORMS[form])
    optimizer.step()
    start = time.perf_counter()
    for _ in range(5):
        optimizer.step()
    return (time.perf_counter() - start) / 5


def trained(form: str) -> torch.Tensor:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(512, 512)) for _ in range(4)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **FORMS[form])
    for _ in range(20):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in params])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = {form: [] for form in FORMS}
    for _ in range(args.rounds):
        for form in FORMS:
            times[form].append(step_time(form))
    reference = trained("loop")
    print(f"{sum(torch.Size(s).numel() for s in SHAPES) / 1e6:.1f} M parameters, {args.threads} threads\n")
    print("| AdamW form | s/step | ratio to the loop | largest difference from the loop |\n|---|---|---|---|")
    loop = statistics.median(times["loop"])
    for form, rows in times.items():
        difference = (trained(form) - reference).abs().max().item()
        print(f"| {form} | {statistics.median(rows):.3f} | {statistics.median(rows) / loop:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
