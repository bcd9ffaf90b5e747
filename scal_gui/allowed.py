"""Where a shared app may read and write: with --listen or --share, every path the page or its API names
(a config's path keys, the Convert tab's source and output, a run to resume, the output folder whose runs are
listed) must lie in one of the app's own folders or one the user allowed; a local app names any path.

The app's folders are its data folder (--data-dir), its output folder (--output-dir, else the presets'),
its caches (the app's cache, where `demo:` names and URL downloads live, and the Hugging Face cache the Hub
downloads go to), the --model-dir folders and the --allow-path folders. A path is resolved (`~`, symlinks,
`..`) before it is compared, so a link inside an allowed folder that points out of it is refused.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from engine import config as schema
from engine import hub, paths
from engine.errors import UserError

# A shard pattern naming more files than this is refused rather than expanded (engine.data.shards bounds
# the shards a pattern may name the same way).
MAX_PATTERN_NAMES = 100_000


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def hf_cache() -> Path:
    """The Hugging Face Hub cache that engine.hub downloads into (HF_HOME, HF_HUB_CACHE respected)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class PathPolicy:
    """The folders the page may name (resolved); `restricted` False (a local app) allows every path."""
    restricted: bool = False
    roots: tuple[Path, ...] = ()

    @classmethod
    def local(cls) -> PathPolicy:
        return cls()

    @classmethod
    def shared(cls, data_dir: Path, output_dir: Optional[str], model_dirs: Iterable[str] = (),
               allowed: Iterable[str] = ()) -> PathPolicy:
        """The policy of an app served to others, from its flags; output_dir None is the schema's default."""
        output = paths.resolve(output_dir or schema.Config().output_dir)
        folders = [data_dir, output, paths.cache_dir(), hf_cache(), *model_dirs, *allowed]
        return cls(restricted=True, roots=tuple(dict.fromkeys(_real(folder) for folder in folders)))

    def allows(self, path) -> bool:
        """Whether path (resolved here) lies inside one of the folders."""
        if not self.restricted:
            return True
        real = _real(path)
        return any(real.is_relative_to(root) for root in self.roots)

    def check(self, what: str, value: str, model: bool = False) -> None:
        """Raise a one-line UserError naming what (a config key, a field) and the path when value names a path
        outside the folders. model: value may be a Hub id or a URL, which are not paths. A `demo:` name is the
        folder of the app's cache it stands for; a shard pattern, also each name it expands to."""
        if not self.restricted or not value:
            return
        if model and (hub.is_url(value) or (hub.parse_hub_id(value) and not _real(value).exists())):
            return
        location = value
        if value.startswith(paths.DEMO_PREFIX):
            # what paths.resolve maps it to, without building the demo model
            location = str(paths.cache_dir() / value[len(paths.DEMO_PREFIX):].strip("/"))
        for name in _locations(what, location):
            if not self.allows(name):
                flag = "--model-dir DIR or --allow-path DIR" if model else "--allow-path DIR"
                raise UserError(f"{what}: {value} ({_real(name)}) is outside the folders this shared app may "
                                f"use; start the app with {flag} to allow it")

    def check_config(self, config: schema.Config) -> None:
        """Check every path key of the config (see engine.config.PathKey)."""
        for key, value, mark in schema.path_values(config):
            self.check(f"config key '{key}'", value, model=mark.model)


def _locations(what: str, value: str) -> list[str]:
    """value itself (as a folder or file key takes it), and for a shard pattern (braces) each name it expands to."""
    if "{" not in value:
        return [value]
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        names = list(itertools.islice(braceexpand(value), MAX_PATTERN_NAMES + 1))
    except UnbalancedBracesError:
        return [value]  # not a pattern: the data source refuses it, any other key takes it as it is
    if len(names) > MAX_PATTERN_NAMES:
        raise UserError(f"{what}: the shard pattern {value} names more than {MAX_PATTERN_NAMES} files")
    return [value, *names]
