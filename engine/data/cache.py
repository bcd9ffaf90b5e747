"""On-disk caches of VAE latents and text-encoder outputs, so that training can skip those models.

Each cache is a folder of safetensors shards named after a fingerprint of everything its values depend
on (the weights of the model that made them, their dtype, the resolution, the crop, CLIP skip): change any
of these and the cache is another folder, so stale values are never read. Shards are written one at a
time as they fill and read by memory map one tensor at a time, so neither building nor training holds a
cache in RAM. Shards get unique names and appear by rename, so concurrent or interrupted builds never
leave a half-written shard; an interrupted build keeps the shards it finished.

Latents are cached only with a centre crop and no augmentation (a random crop or flip differs every
epoch). The cached value is the VAE's distribution (mean and log-variance), not a sample of it, so each
step still draws its own latent exactly as without the cache. Text embeddings are cached only while the
text encoder is frozen and captions are not shuffled or dropped per step. They are keyed by token ids
and computed at full padding: under CLIP's causal attention the first L positions are also the
embedding of the same ids padded to any length L, which is what a batch without pad_tokens uses.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import paths
from ..config import Config
from .dataset import DreamBoothDataset, crop_to_size, load_image, to_tensor, tokenize
from .shards import file_stamp
from ..models.sd import Components
from ..plan import RunPlan

SHARD_BYTES = 256 * 2**20
MAX_OPEN_SHARDS = 64  # per process
# Bump when the pixels a latent is computed from change (resize filter, crop arithmetic).
LATENT_TRANSFORM_VERSION = 1
LATENT_BATCH = 8
TEXT_BATCH = 32


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every weight of a module (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode("utf-8"))
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def key_hash(key: str) -> int:
    """A 64-bit hash of a cache key, what the store's index holds instead of the key's string."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class ShardStore:
    """Tensors by name in the safetensors shards of one folder. Pickles without its open files.

    The index is two NumPy columns, each key's 64-bit hash (sorted) and its shard's number, so that a
    cache of a million tensors costs 12 MB in each data-loader worker rather than a dict of a million
    strings. Two keys that share a hash (about one chance in 10^7 at a million keys) are both found by
    asking their shards."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.shards: list[str] = []
        self._handles: OrderedDict[str, object] = OrderedDict()
        hashes, owners = [], []
        for shard in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else ():
            try:
                with safe_open(shard, framework="pt") as handle:
                    keys = handle.keys()
            except Exception:  # an unreadable shard (disk error, foreign file) is rebuilt, not fatal
                continue
            hashes.append(np.fromiter(map(key_hash, keys), dtype=np.uint64, count=len(keys)))
            owners.append(np.full(len(keys), len(self.shards), dtype=np.int32))
            self.shards.append(shard.name)
        self._index(hashes, owners)

    def _index(self, hashes: list[np.ndarray], owners: list[np.ndarray]) -> None:
        hashes = np.concatenate(hashes or [np.zeros(0, np.uint64)])
        owners = np.concatenate(owners or [np.zeros(0, np.int32)])
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._owners = hashes[order], owners[order]

    def _add(self, shard: str, keys: list[str]) -> None:
        """A shard just written, with its keys."""
        self.shards.append(shard)
        self._index([self._hashes, np.fromiter(map(key_hash, keys), dtype=np.uint64, count=len(keys))],
                    [self._owners, np.full(len(keys), len(self.shards) - 1, dtype=np.int32)])

    def _candidates(self, key: str) -> np.ndarray:
        """The numbers of the shards that may hold key."""
        wanted = np.uint64(key_hash(key))
        first = np.searchsorted(self._hashes, wanted, side="left")
        end = np.searchsorted(self._hashes, wanted, side="right")
        return self._owners[first:end]

    def __contains__(self, key: str) -> bool:
        return len(self._candidates(key)) > 0

    def __len__(self) -> int:
        return len(self._hashes)

    def keys(self) -> list[str]:
        """Every key, read from the shards' headers."""
        from safetensors import safe_open

        found = []
        for shard in self.shards:
            with safe_open(self.folder / shard, framework="pt") as handle:
                found += handle.keys()
        return found

    def get(self, key: str) -> torch.Tensor:
        owners = self._candidates(key).tolist()
        if len(owners) == 1:
            return self._handle(self.shards[owners[0]]).get_tensor(key)
        for owner in owners:  # a shared hash: ask each shard whether it has the key itself
            handle = self._handle(self.shards[owner])
            if key in handle.keys():
                return handle.get_tensor(key)
        raise KeyError(key)

    def _handle(self, shard: str):
        """An open shard; the most recent MAX_OPEN_SHARDS stay open, since each holds its header's table."""
        from safetensors import safe_open

        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.folder / shard, framework="pt")
            if len(self._handles) > MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return handle

    def writer(self) -> "ShardWriter":
        return ShardWriter(self)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": OrderedDict()}


class ShardWriter:
    """Collects new tensors and writes a shard whenever SHARD_BYTES have gathered, and on exit."""

    def __init__(self, store: ShardStore):
        self.store = store
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous().clone()
        self.pending[key] = tensor
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        folder = self.store.folder
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.safetensors"
        temp = folder / f".{name}.tmp"
        save_file(self.pending, str(temp))
        os.replace(temp, folder / name)
        self.store._add(name, list(self.pending))
        self.pending, self.size = {}, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def cache_root(config: Config) -> Path:
    return Path(paths.resolve(config.cache.dir)) if config.cache.dir else paths.cache_dir() / "train-cache"


# -- latents ------------------------------------------------------------------------------------------------

def latent_key(path: str, size: tuple[int, int]) -> str:
    """One image file or shard member (by path, byte size and mtime) cropped to one size."""
    text = f"{file_stamp(path)}|{size[0]}x{size[1]}"
    # A file name that is not UTF-8 holds surrogates: its own bytes are hashed.
    return hashlib.sha1(os.fsencode(text)).hexdigest()


class LatentReader:
    """The cached latent distribution of an image at a size; goes to data-loader workers by pickling."""

    def __init__(self, store: ShardStore):
        self.store = store

    def get(self, path: str, size: tuple[int, int]) -> torch.Tensor:
        return self.store.get(latent_key(path, size))


def cache_latents(dataset: DreamBoothDataset, vae, device: torch.device, folder: Path,
                  log: Callable[[str], None]) -> LatentReader:
    """Encode every (image, size) of the dataset that the cache in `folder` does not have yet."""
    crops = sorted(dataset.crops())
    store = ShardStore(folder)
    missing: dict[tuple[int, int], list[str]] = {}
    for path, size in crops:
        if latent_key(path, size) not in store:
            missing.setdefault(size, []).append(path)
    count = sum(len(group) for group in missing.values())
    log(f"latent cache {folder}: {len(crops) - count} of {len(crops)} image crops cached"
        + (f", encoding {count}" if count else ""))
    dtype = next(vae.parameters()).dtype
    with store.writer() as writer, torch.no_grad():
        for size, group in missing.items():
            for begin in range(0, len(group), LATENT_BATCH):
                chunk = group[begin:begin + LATENT_BATCH]
                pixels = torch.stack([to_tensor(crop_to_size(load_image(p), size[0], size[1], True, None))
                                      for p in chunk])
                moments = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.parameters
                for path, row in zip(chunk, moments):
                    writer.add(latent_key(path, size), row)
    return LatentReader(store)


# -- text embeddings ------------------------------------------------------------------------------------------

def ids_key(ids: list[int], pad_token_id: int) -> str:
    """Token ids without their trailing padding: the same key for any padded length."""
    end = len(ids)
    while end and ids[end - 1] == pad_token_id:
        end -= 1
    return hashlib.sha1(",".join(map(str, ids[:end])).encode("ascii")).hexdigest()


class TextEmbeddingCache:
    """The conditioning of batches of token ids (see models.family), read from the cache instead of the
    text encoder. Each part of a prompt's conditioning is a tensor named `<ids key>/<part>`."""

    def __init__(self, store: ShardStore, pad_token_id: int, parts: tuple[str, ...]):
        self.store = store
        self.pad_token_id = pad_token_id
        self.parts = parts

    def lookup(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each part for input_ids [batch, length]: per-token parts cut to the batch's length."""
        keys = [ids_key(ids, self.pad_token_id) for ids in input_ids.tolist()]
        found = {}
        for part in self.parts:
            rows = torch.stack([self.store.get(f"{key}/{part}") for key in keys])
            found[part] = rows[:, :input_ids.shape[1]] if rows.dim() == 3 else rows
        return found


def cache_text_embeddings(prompts: set[str], family, tokenizer, text_encoder, clip_stop_at_layer: int,
                          device: torch.device, autocast_dtype: Optional[torch.dtype], folder: Path,
                          log: Callable[[str], None]) -> TextEmbeddingCache:
    """Encode every prompt (tokenized as the dataset does) that the cache in `folder` lacks."""
    store = ShardStore(folder)
    length, pad = tokenizer.model_max_length, tokenizer.pad_token_id
    missing: dict[str, list[int]] = {}
    parts = family.conditioning_parts
    for prompt in sorted(prompts):
        ids = tokenize(tokenizer, prompt)
        ids = ids + [pad] * (length - len(ids))
        key = ids_key(ids, pad)
        if any(f"{key}/{part}" not in store for part in parts):
            missing[key] = ids
    log(f"text-embedding cache {folder}: {len(prompts) - len(missing)} of {len(prompts)} prompts cached"
        + (f", encoding {len(missing)}" if missing else ""))
    items = list(missing.items())
    # The same autocast as the training forward pass, so cached and computed embeddings agree.
    with store.writer() as writer, torch.no_grad(), torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        for begin in range(0, len(items), TEXT_BATCH):
            chunk = items[begin:begin + TEXT_BATCH]
            input_ids = torch.tensor([ids for _, ids in chunk], dtype=torch.long, device=device)
            conditioning = family.encode_text(text_encoder, input_ids, clip_stop_at_layer)
            for part, values in conditioning.items():
                for (key, _), row in zip(chunk, values):
                    writer.add(f"{key}/{part}", row)
    return TextEmbeddingCache(store, pad, parts)


# -- wiring for a training run --------------------------------------------------------------------------------

def latent_folder(config: Config, vae) -> Path:
    return cache_root(config) / "latents-{}".format(fingerprint(
        vae=weights_digest(vae), resolution=config.data.resolution, center_crop=True,
        transform=LATENT_TRANSFORM_VERSION))


def text_folder(config: Config, plan: RunPlan, family, text_encoder) -> Path:
    return cache_root(config) / "text-{}".format(fingerprint(
        text_encoder=weights_digest(text_encoder), clip_stop_at_layer=config.clip_stop_at_layer,
        parts=family.conditioning_parts, autocast=str(plan.autocast)))


def explain_uncached(config: Config, plan: RunPlan, log: Callable[..., None]) -> None:
    """Say why a cache the config asks for does not apply."""
    if config.cache.latents and not plan.cache_latents:
        log("latents are not cached: with random crops (data.center_crop: false) or augment steps each "
            "epoch sees different pixels", "warning")
    if config.cache.text_embeddings and not plan.cache_text:
        log("text embeddings are not cached: the text encoder is trained or captions change every step "
            "(captions.shuffle_tags / captions.tag_dropout)", "warning")


def attach_caches(config: Config, plan: RunPlan, family, components: Components, dataset: DreamBoothDataset,
                  device: torch.device, log: Callable[..., None], explain: bool = True) -> Optional[TextEmbeddingCache]:
    """Build the caches the plan has (encoding only what they lack); latents go to the dataset, the returned
    text cache (or None) to the forward pass. A model whose outputs are all cached leaves the training device."""
    if explain:
        explain_uncached(config, plan, log)
    text_cache = None
    try:
        if plan.cache_latents:
            vae = components.vae
            dataset.latents = cache_latents(dataset, vae, device, latent_folder(config, vae), log)
        if plan.cache_text:
            encoder = components.text_encoder
            text_cache = cache_text_embeddings(dataset.prompts(), family, components.tokenizer, encoder,
                                               config.clip_stop_at_layer, device, plan.autocast,
                                               text_folder(config, plan, family, encoder), log)
    except OSError as error:  # a read-only or full disk: the caches only save time, the run goes on
        dataset.latents = None
        log(f"the cache cannot be written ({error}); training goes on without it", "warning")
        return None
    resting = [(name, model) for name, model, off in (("VAE", components.vae, plan.vae_off_device),
                                                      ("text encoder", components.text_encoder,
                                                       plan.text_encoder_off_device)) if off]
    if resting:
        from ..job import release_memory

        for _, model in resting:
            model.to("cpu")
        release_memory()
        log(f"the {' and '.join(name for name, _ in resting)} left the training device: their outputs come from "
            "the cache")
    return text_cache
