"""Textual-inversion embeddings: new tokens in the tokenizer and their vectors in the text encoder."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserError

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


def read_embedding_file(path: Path) -> torch.Tensor:
    """Vectors [n, dim] from the A1111 (.pt), safetensors or diffusers (.bin) layouts."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign files surface many exception types
        raise UserError(f"config key 'custom_embeddings.path': cannot read {path}: {error}") from None
    if isinstance(data, dict) and "string_to_param" in data:
        data = data["string_to_param"]
    if isinstance(data, dict) and "emb_params" in data:
        data = data["emb_params"]
    if isinstance(data, dict):
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise UserError(f"config key 'custom_embeddings.path': {path} holds {len(tensors)} tensors, expected one")
        data = tensors[0]
    if not isinstance(data, torch.Tensor):
        raise UserError(f"config key 'custom_embeddings.path': {path} is not an embedding file")
    return data.detach().float().reshape(-1, data.shape[-1])


def embedding_files(path: str) -> list[Path]:
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        return sorted(p for p in root.iterdir() if p.suffix in EMBEDDING_SUFFIXES)
    raise UserError(f"config key 'custom_embeddings.path': not found: {path}")


def load_custom_embeddings(path: str, tokenizer, text_encoder) -> dict[str, str]:
    """Add each file's vectors under its file name; returns token -> the text it expands to in prompts.

    A multi-vector embedding named `style` becomes tokens `style style_1 style_2 …`, the naming diffusers'
    pipelines expand at sampling time too.
    """
    expansions: dict[str, str] = {}
    embedding = text_encoder.get_input_embeddings()
    for file in embedding_files(path):
        vectors = read_embedding_file(file)
        if vectors.shape[-1] != embedding.weight.shape[-1]:
            raise UserError(f"config key 'custom_embeddings.path': {file.name} has vectors of size "
                            f"{vectors.shape[-1]}, the text encoder expects {embedding.weight.shape[-1]}")
        name = file.stem
        tokens = [name] + [f"{name}_{i}" for i in range(1, vectors.shape[0])]
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise UserError(f"config key 'custom_embeddings.path': the token '{name}' already exists in the tokenizer")
        text_encoder.resize_token_embeddings(len(tokenizer))
        embedding = text_encoder.get_input_embeddings()
        ids = tokenizer.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            embedding.weight[ids] = vectors.to(embedding.weight.dtype)
        expansions[name] = " ".join(tokens)
    return expansions


def expand_tokens(text: str, expansions: dict[str, str]) -> str:
    for token, expanded in expansions.items():
        if expanded != token:
            text = re.sub(rf"(?<![\w-]){re.escape(token)}(?![\w-])", expanded, text)
    return text
