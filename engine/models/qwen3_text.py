"""Qwen3 as a text encoder (Z-Image's and FLUX.2 [klein]'s): its tokenizer, read from a model's tokenizer/ folder
or built offline from Qwen's vocabulary (`qwen2_vocab`) with Qwen3's special tokens, and its turn format."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

# Qwen's <|endoftext|>, the tokenizer's padding (Qwen3-4B's tokenizer_config.json pad_token)
PAD_TOKEN_ID = 151643
# Qwen3's (text) turn format (Qwen/Qwen3-4B's tokenizer_config.json, Z-Image's tokenizer) for system, user
# and assistant turns, without its tool-calling and reasoning-history parts: no default system turn, and the
# empty think block after the assistant's start when enable_thinking is false.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")


def qwen3_tokenizer():
    """Qwen3-4B's tokenizer built offline: Qwen's vocabulary (`qwen2_vocab`), Qwen3's special tokens at their ids
    and its turn format, which a saved pipeline keeps as the real one does."""
    import tempfile

    from transformers import AutoTokenizer

    from .tiny_captioners import QWEN_SPECIALS, qwen_tokenizer_files

    with tempfile.TemporaryDirectory() as folder:
        qwen_tokenizer_files(Path(folder), QWEN_SPECIALS, CHAT_TEMPLATE)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_qwen_tokenizer(folder: Path, model: str):
    """The tokenizer in a model's folder, refused (naming `model`) unless it is a Qwen tokenizer padding with
    <|endoftext|>."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise UserError(f"config key 'model': {folder} holds no Qwen tokenizer (tokenizer.json or vocab.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id != PAD_TOKEN_ID:
        raise UserError(f"config key 'model': {folder} pads with id {tokenizer.pad_token_id}, not Qwen's "
                        f"<|endoftext|> ({PAD_TOKEN_ID}); it is not {model}'s tokenizer")
    return tokenizer
