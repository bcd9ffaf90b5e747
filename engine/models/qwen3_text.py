"""Qwen3 as a text encoder (Z-Image's and FLUX.2 [klein]'s): its tokenizer, read from a model's tokenizer/ folder
or built offline from Qwen's vocabulary (`qwen2_vocab`) with Qwen3's special tokens, its turn format, and the
model from a text-encoder file as ComfyUI users keep it (text_encoders/, qwen_3_4b.safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

# Qwen3 as a causal LM (Qwen3ForCausalLM's files, ComfyUI's) nests the decoder under model.
QWEN_PREFIX = "model."
HEAD = "lm_head.weight"

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


def qwen3_from_file(state: dict, source: str, dtype: torch.dtype, config: dict, wanted: str,
                    causal_lm: bool = False):
    """Qwen3 from a text-encoder file's tensors (the decoder under model. as Qwen3ForCausalLM names it, or bare), built
    from `config` with the sizes the tensors show: Qwen3Model, or with causal_lm Qwen3ForCausalLM, whose head is the
    file's or else the embedding (tied, as Qwen3-4B's). Anything else is refused naming text_encoder, which should
    be `wanted`."""
    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from .single_file import _count, _load_weights

    head = state.get(HEAD)
    if any(key.startswith(QWEN_PREFIX) for key in state):
        state = {key[len(QWEN_PREFIX):]: value for key, value in state.items() if key.startswith(QWEN_PREFIX)}
    state = {key: value for key, value in state.items() if key != HEAD}
    if "embed_tokens.weight" not in state or "layers.0.self_attn.q_norm.weight" not in state:
        raise UserError(f"config key 'text_encoder': {source} is not a Qwen3 text encoder (no embed_tokens or "
                        f"q_norm weights); set it to {wanted}")
    vocab, hidden = state["embed_tokens.weight"].shape
    width = state["layers.0.self_attn.q_norm.weight"].shape[0]
    config = {**config, "vocab_size": vocab, "hidden_size": hidden, "head_dim": width,
              "num_hidden_layers": _count(state, "layers."), "max_window_layers": _count(state, "layers."),
              "intermediate_size": state["layers.0.mlp.gate_proj.weight"].shape[0],
              "num_attention_heads": state["layers.0.self_attn.q_proj.weight"].shape[0] // width,
              "num_key_value_heads": state["layers.0.self_attn.k_proj.weight"].shape[0] // width,
              "tie_word_embeddings": head is None}
    with init_empty_weights():
        model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(Qwen3Config.from_dict(config))
    if not causal_lm:
        return _load_weights(model, state, "text_encoder", source, dtype)
    weights = {QWEN_PREFIX + key: value for key, value in state.items()}
    model = _load_weights(model, {**weights, HEAD: state["embed_tokens.weight"] if head is None else head},
                          "text_encoder", source, dtype)
    if head is None:
        model.tie_weights()  # one tensor again: the cast gave the head a copy of the embedding
    return model
