"""The CLIP tokenizer of every SD family, built from the BPE vocabulary open_clip ships.

SD1.x, SD2.x and SDXL share OpenAI CLIP's 49,408-token vocabulary (49,152 merges over the 256 byte
symbols, each alone and word-final, plus the start and end tokens); they differ only in the padding token:
the end token for OpenAI CLIP ViT-L, "!" (id 0) for OpenCLIP ViT-H and ViT-bigG. A single-file model
holds no tokenizer, so this one stands in for the `tokenizer/` folder of a diffusers model.

Only the package's data file is read: the package itself is never imported (it would pull in
torchvision and timm).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

VOCAB_PACKAGE = "open_clip"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The merges the CLIP vocabulary keeps: the file has more, and the vocabulary's size is fixed by these.
MERGES = 49152 - 256 - 2
START, END = "<|startoftext|>", "<|endoftext|>"
# Each family's tokenizers (as in its diffusers folders) and their padding tokens.
PAD_TOKENS = {"sd15": {"tokenizer": END}, "sd21": {"tokenizer": "!"},
              "sdxl": {"tokenizer": END, "tokenizer_2": "!"}}
MAX_LENGTH = 77


def byte_symbols() -> list[str]:
    """The character each byte stands for in the BPE (GPT-2's table), in the vocabulary's order: the
    printable bytes as themselves first, then the others mapped past 255 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def vocabulary_file() -> Path:
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / VOCAB_FILE
        if path.is_file():
            return path
    raise UserError(f"the CLIP vocabulary ({VOCAB_PACKAGE}/{VOCAB_FILE}) is not installed: run "
                    "./launch.sh once, or pip install --no-deps open_clip_torch")


@lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token → id, merges as 'a b' lines) in CLIP's order: bytes, word-final bytes, merges, specials."""
    lines = gzip.open(vocabulary_file(), "rt", encoding="utf-8").read().split("\n")
    merges = tuple(lines[1:MERGES + 1])
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges] + [START, END]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer_files(directory: Path) -> Path:
    """vocab.json and merges.txt, as in a diffusers model's tokenizer/ folder."""
    vocab, merges = vocabulary()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    return directory


def clip_tokenizer(pad_token: str = END):
    """A CLIPTokenizer over the CLIP vocabulary with the given padding token, 77 tokens long."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        files = write_tokenizer_files(Path(folder))
        return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=MAX_LENGTH,
                             pad_token=pad_token, bos_token=START, eos_token=END, unk_token=END)
