"""T5-XXL's tokenizer (Flux.1's second one), installed offline from the one copy the package registry holds.

Flux.1 pads T5's prompt to 512 (dev) or 256 (schnell) tokens with google/t5-v1_1-xxl's SentencePiece
Unigram vocabulary: 32,000 pieces plus 100 sentinel tokens, `<pad>` 0, `</s>` 1, `<unk>` 2. No PyPI package
ships that vocabulary as a data file; the source distribution of stable-diffusion-cpp-python embeds its
tokenizer.json as a C byte array (`t5_tokenizer_json_str` in stable-diffusion.cpp's `clip_t5.hpp`).
`install()` fetches that pinned sdist with pip, checks its hash, decodes the array and writes the JSON into
the environment, where `tokenizer_file()` finds it. `./launch.sh` runs it after the requirements.

    python -m engine.models.t5_vocab    install it (does nothing when it is already there)
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import UserError

PACKAGE = "stable-diffusion-cpp-python==0.4.7"
# sha256 of stable_diffusion_cpp_python-0.4.7.tar.gz as published on PyPI
SDIST_SHA256 = "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282"
MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY = "t5_tokenizer_json_str"
VOCAB_SIZE = 32100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def install_dir() -> Path:
    return Path(sys.prefix) / "share" / "scal-sdt" / "t5"


def tokenizer_file() -> Path:
    path = install_dir() / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"T5's tokenizer (for Flux.1) is not installed at {path}: run ./launch.sh once, "
                        "or python -m engine.models.t5_vocab")
    return path


def t5_tokenizer(max_length: int):
    """A T5TokenizerFast over the installed vocabulary that pads and truncates to max_length."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(tokenizer_file=str(tokenizer_file()), model_max_length=max_length,
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def decode_array(source: str, name: str = ARRAY) -> bytes:
    """The bytes of the C array `name[] = {0x.., ...};` in source."""
    start = source.find(f"{name}[]")
    if start < 0:
        raise ValueError(f"no array {name} in the source")
    body = source[source.index("{", start) + 1:source.index("}", start)]
    return bytes.fromhex("".join(re.findall(r"0x([0-9a-fA-F]{2})", body)))


def _check_json(data: bytes) -> None:
    import json

    tokenizer = json.loads(data)
    vocab = tokenizer["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    if (tokenizer["model"]["type"], len(vocab) + sum(t["id"] >= len(vocab) for t in tokenizer["added_tokens"]),
            specials.get("<pad>"), specials.get("</s>"), specials.get("<unk>")) != \
            ("Unigram", VOCAB_SIZE, PAD_ID, EOS_ID, UNK_ID):
        raise ValueError("the decoded tokenizer.json is not T5-v1.1's vocabulary")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def install(sdist: Path | None = None) -> Path:
    """Write tokenizer.json from the pinned sdist (downloaded with pip unless given); skips when present."""
    target = install_dir() / "tokenizer.json"
    if target.is_file():
        return target
    data = decode_array(sdist_member(MEMBER, sdist))
    _check_json(data)
    write_atomically(target, data)
    return target


def sdist_member(name: str, sdist: Path | None = None) -> str:
    """The text of the member `name` of the pinned sdist (downloaded with pip unless given), hash checked."""
    with tempfile.TemporaryDirectory() as folder:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            PACKAGE, "-d", folder], check=True)
            (sdist,) = Path(folder).glob("*.tar.gz")
        if _sha256(sdist) != SDIST_SHA256:
            raise ValueError(f"{sdist} is not the pinned {PACKAGE} (sha256 differs)")
        with tarfile.open(sdist) as archive:
            (member,) = [m for m in archive.getmembers() if m.name.endswith("/" + name)]
            return archive.extractfile(member).read().decode("ascii")


def write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, target)  # readers see the whole file or none


if __name__ == "__main__":
    print(install())
