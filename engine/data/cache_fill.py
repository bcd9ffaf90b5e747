"""Caches written by the first epoch's own steps (cache.fill: first_epoch).

Building the caches before training makes a large dataset wait hours for its first step. Instead, each
step of the first epoch encodes its images and captions as an uncached run does and hands what it
encoded to FirstEpochFill, which adds it to the very shards `attach_caches` reads. When the epoch ends
the trainer calls `attach_caches`, which then only encodes what the epoch did not draw (images of
buckets too small for the process count) and from the second epoch on everything comes from the caches.

Values are keyed and stored exactly as `cache` does: latents by file and size, text by token ids at
full padding. A prompt is therefore encoded at full padding while it is being recorded and cut to the
batch's length, which under CLIP's causal attention is the embedding of the batch's own padding.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .cache import ShardStore, ids_key, latent_folder, latent_key, text_folder


class FirstEpochFill:
    def __init__(self, latents: Optional[ShardStore], text: Optional[ShardStore], pad_token_id: int,
                 max_length: int, warn: Callable[[str], None]):
        self.latents = latents.writer() if latents is not None else None
        self.text = text.writer() if text is not None else None
        self.pad_token_id, self.max_length = pad_token_id, max_length
        self.warn = warn
        self.failed = False  # a write failed: the run goes on uncached

    @classmethod
    def for_run(cls, config, plan, family, components, warn: Callable[[str], None]) -> "FirstEpochFill":
        return cls(ShardStore(latent_folder(config, components.vae)) if plan.cache_latents else None,
                   ShardStore(text_folder(config, plan, family, components.text_encoder)) if plan.cache_text
                   else None, components.tokenizer.pad_token_id, components.tokenizer.model_max_length, warn)

    @property
    def records_text(self) -> bool:
        return self.text is not None and not self.failed

    def add_latents(self, batch: dict, moments: torch.Tensor) -> None:
        """The VAE's mean and log-variance of each row of batch (pixels of its paths at the batch's size)."""
        if self.latents is None or self.failed:
            return
        size = (batch["pixel_values"].shape[-1], batch["pixel_values"].shape[-2])
        store = self.latents.store
        for path, row in zip(batch["paths"], moments):
            key = latent_key(path, size)
            if key not in store and key not in self.latents.pending:
                self._write(self.latents, key, row)  # CPU–GPU sync: the row is copied to the CPU

    def full_padding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, length] padded to the tokenizer's full length, as the cache encodes them."""
        missing = self.max_length - input_ids.shape[1]
        return torch.nn.functional.pad(input_ids, (0, missing), value=self.pad_token_id) if missing else input_ids

    def add_text(self, full_ids: torch.Tensor, conditioning: dict, length: int) -> dict:
        """Record the conditioning of full-padding ids; return it cut to `length` tokens, as the cache reads it."""
        store = self.text.store
        for row, ids in enumerate(full_ids.tolist()):
            key = ids_key(ids, self.pad_token_id)
            for part, values in conditioning.items():
                name = f"{key}/{part}"
                if name not in store and name not in self.text.pending:
                    self._write(self.text, name, values[row])
        return {part: values[:, :length] if values.dim() == 3 else values for part, values in conditioning.items()}

    def _write(self, writer, key: str, tensor: torch.Tensor) -> None:
        if self.failed:
            return
        try:
            writer.add(key, tensor)
        except OSError as error:  # a full or read-only disk: the cache is an optimisation, the run goes on
            self._fail(error)

    def _fail(self, error: OSError) -> None:
        self.failed = True
        self.warn(f"the cache cannot be written ({error}); training goes on without it")

    def flush(self) -> None:
        """Write out what is pending; recording goes on."""
        for writer in (self.latents, self.text):
            if writer is not None and not self.failed:
                try:
                    writer.flush()
                except OSError as error:
                    self._fail(error)
