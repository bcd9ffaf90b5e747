"""`python -m engine cache --config C`: fill a config's latent and text-embedding caches ahead of training.

It builds exactly the caches the run would build at its start (same models, crops, fingerprints), so a run
started afterwards finds them full. For a large dataset this is the slow part of a first start; doing it
apart lets it run on another machine or be interrupted: finished shards stay, and the next call encodes
only what is missing.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def cmd_cache(args: argparse.Namespace) -> int:
    from .. import config as schema
    from .. import paths
    from ..errors import UserError
    from ..models.family import family_for
    from ..plan import make_plan
    from ..train import select_device
    from .cache import attach_caches
    from .prepare import prepare_data

    config = schema.load(args.config, args.set)
    if not (config.cache.latents or config.cache.text_embeddings):
        raise UserError("config keys 'cache.latents' and 'cache.text_embeddings': both are false, nothing to cache")
    device = select_device(config)
    plan = make_plan(config, device.type)
    family = family_for(config)
    components = family.load(config)
    expansions = {}
    if config.custom_embeddings.enabled:
        from ..models.embeddings import load_custom_embeddings

        expansions = load_custom_embeddings(paths.resolve(config.custom_embeddings.path), components.tokenizer,
                                            components.text_encoder)
    for model in (components.vae, components.text_encoder):
        model.requires_grad_(False).eval().to(device)
    components.vae.enable_slicing()  # as in training: one image at a time through the frozen VAE
    data = prepare_data(config, components.tokenizer, config.seed or 0, prompt_expansions=expansions)
    text_cache = attach_caches(config, plan, family, components, data.dataset, device,
                               lambda message, *level: print(message))
    for cache in (data.dataset.latents, text_cache):
        if cache is not None:
            print(f"{cache.store.folder}: {len(cache.store)} tensors, {_folder_bytes(cache.store.folder) / 2**20:.1f} MiB")
    return 0


def register(subparsers) -> None:
    from ..config import add_overrides_argument

    parser = subparsers.add_parser("cache", help="fill a config's latent and text-embedding caches before training")
    parser.add_argument("--config", required=True, help="YAML config file")
    add_overrides_argument(parser)
    parser.set_defaults(func=cmd_cache)
