"""Single-file sizes `python -m engine convert` writes for the SD1.5 and SD2.1 architectures.

Computed from the real architectures on the meta device (no weights needed) with the converter's own
estimate_output_bytes; a .safetensors file adds a header of about 100 KB. Prints a Markdown table.

    python bench/convert_sizes.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.models.convert import DTYPES, estimate_output_bytes  # noqa: E402
from engine.models.single_file import empty_models  # noqa: E402

# (flags, unet, vae, text encoder dtype or None when left out)
VARIANTS = [
    ("(defaults)", "fp32", "fp32", "fp32"),
    ("--unet-dtype fp16 --vae-dtype fp16 --text-encoder-dtype fp16", "fp16", "fp16", "fp16"),
    ("--no-text-encoder --unet-dtype fp16", "fp16", "fp32", None),
    ("--no-text-encoder --no-vae --unet-dtype fp16", "fp16", None, None),
]


def main() -> None:
    print("| model | convert flags | bytes | GB | GiB |")
    print("|---|---|---|---|---|")
    for family, label in (("sd15", "SD1.5"), ("sd21", "SD2.1")):
        models = empty_models(family)
        for flags, *dtypes in VARIANTS:
            chosen = {name: DTYPES[d] for name, d in zip(("unet", "vae", "text_encoder"), dtypes) if d}
            size = estimate_output_bytes({name: models[name] for name in chosen}, chosen)
            print(f"| {label} | `{flags}` | {size:,} | {size / 1e9:.2f} | {size / 2**30:.2f} |")


if __name__ == "__main__":
    main()
