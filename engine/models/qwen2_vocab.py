"""Qwen2's byte-level BPE vocabulary (Qwen2.5-VL's and Qwen3-VL's tokenizer), installed offline from the pinned
sdist `t5_vocab` reads: stable-diffusion.cpp embeds Qwen2's merges as a C byte array
(`qwen2_merges_utf8_c_str` in `vocab/qwen.hpp`).

Qwen2's vocabulary is implied by its merges: the 256 byte symbols in GPT-2's byte-to-unicode order, then one
token per merge in rank order (151,643 tokens), then the special tokens from `<|endoftext|>` (151643) on.
`install()` writes `vocab.json` and `merges.txt` into the environment, where `files()` finds them; `./launch.sh`
runs it after the requirements.

    python -m engine.models.qwen2_vocab    install it (does nothing when it is already there)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError
from . import t5_vocab

MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/qwen.hpp"
ARRAY = "qwen2_merges_utf8_c_str"
BPE_TOKENS = 151643  # the ids below the first special token, <|endoftext|>


def install_dir() -> Path:
    return Path(sys.prefix) / "share" / "scal-sdt" / "qwen2"


def files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of the installed vocabulary."""
    vocab, merges = install_dir() / "vocab.json", install_dir() / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise UserError(f"Qwen2's vocabulary is not installed at {install_dir()}: run ./launch.sh once, "
                        "or python -m engine.models.qwen2_vocab")
    return vocab, merges


def vocab_from_merges(merges: list[str]) -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + ["".join(merge.split(" ")) for merge in merges]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != BPE_TOKENS:
        raise ValueError("the decoded merges are not Qwen2's vocabulary")
    return vocab


def install(sdist: Path | None = None) -> Path:
    """Write vocab.json and merges.txt from the pinned sdist (downloaded with pip unless given); skips when
    present. Returns the folder."""
    folder = install_dir()
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    text = t5_vocab.decode_array(t5_vocab.sdist_member(MEMBER, sdist), ARRAY).decode("utf-8")
    merges = [line for line in text.split("\n") if line]
    vocab = vocab_from_merges(merges)
    t5_vocab.write_atomically(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    t5_vocab.write_atomically(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return folder


if __name__ == "__main__":
    print(install())
