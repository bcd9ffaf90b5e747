"""Base models fetched once and then read offline: a Hugging Face Hub id or an https URL in the config's
`model` key becomes a local folder or file, so everything after `sd.resolve_model_path` is unchanged.

What `model` names (see README, "Base models from the Hub"):

- an existing local path always wins, whatever its shape;
- `https://…/name.safetensors` (or http) is downloaded into `paths.cache_dir() / "downloads"`: written to a
  `.part` file, resumed with an HTTP Range request when cut off, renamed when complete, its SHA-256 checked
  against `model_sha256` when given;
- otherwise a value shaped `org/name`, `org/name@revision` or `org/name[@revision]/path/in/repo/file.safetensors`
  is a Hub id: a diffusers repo is fetched with `snapshot_download` (only model_index.json and each component's
  configs, tokenizer files and non-variant .safetensors weights), one file with `hf_hub_download`, both into
  huggingface_hub's cache (HF_HOME, HF_HUB_CACHE respected). A model already in the cache is used without any
  request; HF_HUB_OFFLINE=1 or no network only works for those.

Errors are UserErrors of one line naming the config key `model` (or `model_sha256`).
Progress goes to whoever installed a sink with `report_to` (a job's `emit`: events.Log lines with the bytes
done and total), else to the thread's notices sink (`engine.notices`), else to a tqdm bar on stderr.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import events, notices, paths
from .errors import UserError

# org/name, then @revision (no slash), then a path in the repo ending in .safetensors.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[\w.-]+))?"
                     r"(?:/(?P<file>(?:[\w.-]+/)*[\w.-]+\.safetensors))?$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
# Files of a diffusers component the engine reads: configs (and sharded weights' indexes), tokenizer files,
# safetensors weights. Variants (diffusion_pytorch_model.fp16.safetensors, model.safetensors.index.fp16.json)
# and other formats (.bin, .ckpt, .onnx, .msgpack) are never fetched.
_COMPONENT_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.safetensors")
_IGNORE_PATTERNS = ["*/*.*.safetensors", "*.index.*.json", "*.bin.index.json", "*.msgpack.index.json"]
REPORT_EVERY_S = 2.0


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: Optional[str] = None
    file: Optional[str] = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f"/{self.file}" if self.file else "")


def is_url(model: str) -> bool:
    return model.startswith(("https://", "http://"))


def parse_hub_id(model: str) -> Optional[HubRef]:
    """The Hub reference a `model` value is shaped as, or None (absolute, ~, ./ or ../ paths, backslashes,
    `demo:`, three or more parts not ending in .safetensors are never Hub ids)."""
    match = _HUB_ID.match(model or "")
    if match is None or ".." in model or "--" in match["repo"]:
        return None
    return HubRef(match["repo"], match["revision"], match["file"])


# -- progress ---------------------------------------------------------------------------------------------
_local = threading.local()


@contextmanager
def report_to(emit: Callable[[events.Event], None]) -> Iterator[None]:
    """Send this thread's download progress to emit (a Job's emit) as events.Log, for the duration."""
    previous = getattr(_local, "emit", None)
    _local.emit = emit
    try:
        yield
    finally:
        _local.emit = previous


def _sink() -> Optional[Callable[[str], None]]:
    emit = getattr(_local, "emit", None)
    if emit is not None:
        return lambda message: emit(events.Log(level="info", message=message))
    if notices.collecting():  # inside a job: its notices become its log
        return notices.warn
    return None


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


class _Reporter:
    """Bytes done of a total, told to the sink at most every REPORT_EVERY_S seconds and once at the end."""

    def __init__(self, what: str, say: Callable[[str], None]):
        self.what, self.say = what, say
        self.done, self.total, self._last = 0, 0, 0.0
        self._lock = threading.Lock()

    def add_total(self, total) -> None:
        with self._lock:
            self.total += int(total or 0)

    def update(self, count) -> None:
        with self._lock:
            self.done += int(count or 0)
            now = time.monotonic()
            if now - self._last < REPORT_EVERY_S:
                return
            self._last = now
        self.tell()

    def tell(self, state: str = "downloading") -> None:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        self.say(f"{state} {self.what}: {_size(self.done)} of {_size(self.total)}{share}")


def _tqdm_class(reporter: Optional[_Reporter]):
    """A tqdm class for huggingface_hub that forwards bytes to reporter and draws nothing; None keeps
    huggingface_hub's own bars (no sink: a terminal)."""
    if reporter is None:
        return None
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Forwarding(hf_tqdm):
        def __init__(self, *args, **kwargs):
            # snapshot_download keeps two byte bars, network and disk: the disk one (bytes complete) is told
            counted = kwargs.get("unit") == "B" and not str(kwargs.get("name") or "").endswith(".transfer")
            self._counted = False
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._counted = counted
            if counted:
                reporter.add_total(self.total)
                reporter.update(self.n)

        def update(self, n=1):
            if self._counted:
                reporter.update(n)
            return super().update(n)

        def __setattr__(self, name, value):
            # snapshot_download grows its bar's total as each file starts
            if name == "total" and getattr(self, "_counted", False):
                reporter.add_total((value or 0) - (getattr(self, "total", 0) or 0))
            super().__setattr__(name, value)

    return Forwarding


# -- the Hub ----------------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_downloaded(ref: HubRef, shown: str) -> UserError:
    why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face Hub cannot be reached"
    return UserError(f"config key 'model': not found: {shown}: no such local path, and the Hugging Face Hub model "
                     f"{ref} is not downloaded and the machine is offline ({why}); run once with network access to "
                     "download it")


def _check_reachable(ref: HubRef) -> None:
    """One request without huggingface_hub's retries (which wait some 20 s on a machine without network): the
    repo, its revision and the Hub itself, each refused at once."""
    from huggingface_hub import HfApi

    httpx = _httpx()
    try:
        HfApi().repo_info(ref.repo, revision=ref.revision, timeout=15)
    except (httpx.ConnectError, httpx.TimeoutException):
        raise UserError("offline") from None


def _httpx():
    """The HTTP library huggingface_hub raises the errors of."""
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub before its own httpx fork
        import httpx
    return httpx


def download_hub(ref: HubRef, sha256: Optional[str] = None, shown: Optional[str] = None,
                 patterns: Optional[list[str]] = None) -> str:
    """The local folder (diffusers repo) or file (a .safetensors in a repo) of a Hub reference: from the
    cache without any request when complete there, else downloaded. `patterns`, when given, fetch the files
    of a repo that is no diffusers one (a captioning model) that match them, instead of a pipeline's.
    Raises UserError naming `model`; a repo the Hub does not have gives "not found: <shown>"."""
    from huggingface_hub import errors as hf_errors

    shown = shown or str(ref)
    _check_format(sha256)
    try:
        try:
            local = _fetch(ref, local_only=True, reporter=None, patterns=patterns)
        except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError, FileNotFoundError):
            if _offline():
                raise _not_downloaded(ref, shown) from None
            try:
                _check_reachable(ref)
            except UserError:
                raise _not_downloaded(ref, shown) from None
            say = _sink()
            reporter = _Reporter(str(ref), say) if say else None
            local = _fetch(ref, local_only=False, reporter=reporter, patterns=patterns)
            if reporter is not None:
                reporter.tell("downloaded")
    except UserError:
        raise
    except hf_errors.GatedRepoError:
        raise UserError(f"config key 'model': {ref.repo} is gated on the Hugging Face Hub: accept its terms on "
                        "its page and log in (`hf auth login`, or set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"config key 'model': the Hugging Face Hub repo {ref.repo} has no revision "
                        f"{ref.revision!r}") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"config key 'model': not found: {shown} (no such local path, nor a Hugging Face Hub "
                        "model you can access)") from None
    except hf_errors.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        raise _not_downloaded(ref, shown) from None
    except hf_errors.EntryNotFoundError:
        missing = ref.file or "model_index.json"
        hint = "" if ref.file else ("; it is not a diffusers model: name one of its .safetensors files, "
                                    f"{ref.repo}/<file>.safetensors")
        raise UserError(f"config key 'model': the Hugging Face Hub repo {ref.repo} has no {missing}{hint}") from None
    except hf_errors.HfHubHTTPError as error:
        raise UserError(f"config key 'model': downloading {shown} failed: {_first_line(error)}") from None
    except (OSError, _httpx().HTTPError) as error:  # a full disk, a cut connection, a proxy
        raise UserError(f"config key 'model': downloading {shown} failed: {_first_line(error)}") from None
    if sha256 and Path(local).is_file():
        check_sha256(Path(local), sha256, remove=False)
    return local


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else error.__class__.__name__


def _fetch(ref: HubRef, local_only: bool, reporter: Optional[_Reporter], patterns: Optional[list[str]] = None) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    common = dict(repo_id=ref.repo, revision=ref.revision, local_files_only=local_only)
    tqdm_class = _tqdm_class(reporter)
    if ref.file:
        return hf_hub_download(filename=ref.file, tqdm_class=tqdm_class, **common)
    if patterns is not None:
        return snapshot_download(allow_patterns=patterns, tqdm_class=tqdm_class, **common)
    index = hf_hub_download(filename="model_index.json", **common)
    components = [name for name, value in json.loads(Path(index).read_text(encoding="utf-8")).items()
                  if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None]
    allow = ["model_index.json"] + [f"{name}/{pattern}" for name in components for pattern in _COMPONENT_PATTERNS]
    return snapshot_download(allow_patterns=allow, ignore_patterns=_IGNORE_PATTERNS, tqdm_class=tqdm_class,
                             **common)


# -- URLs -------------------------------------------------------------------------------------------------
def download_url(url: str, sha256: Optional[str] = None, attempts: int = 5) -> str:
    """The local copy of a .safetensors URL in cache_dir()/downloads, downloaded when missing (resumed after
    a cut, up to `attempts` tries in a row), its SHA-256 checked when sha256 is given."""
    from urllib.parse import unquote, urlparse

    name = unquote(Path(urlparse(url).path).name)
    if not name.endswith(".safetensors"):
        raise UserError(f"config key 'model': a URL must name a .safetensors file (other formats may run code "
                        f"when loaded): {url}")
    _check_format(sha256)
    folder = paths.cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = folder / name
    if not target.is_file():
        if _offline():
            raise UserError(f"config key 'model': {url} is not downloaded and the machine is offline "
                            "(HF_HUB_OFFLINE is set)")
        folder.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock  # a huggingface_hub dependency

        # torchrun's processes all resolve the model: one downloads, the others wait for its file
        with FileLock(str(folder / f"{name}.lock")):
            if not target.is_file():
                _download(url, target, attempts)
    if sha256:
        check_sha256(target, sha256, remove=True)
    return str(target)


def _download(url: str, target: Path, attempts: int) -> None:
    import http.client
    import urllib.error
    import urllib.request

    part = target.with_name(target.name + ".part")
    say = _sink()
    reporter = _Reporter(url, say) if say else None
    bar = None
    tries = 0
    while True:
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "scal-sdt",
                                                       **({"Range": f"bytes={have}-"} if have else {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = have and response.status == 206 and \
                    response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
                if not resumed:
                    have = 0  # the server sent the whole file
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else 0
                if reporter is not None:
                    reporter.total, reporter.done = total, have
                else:
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(unit="B", unit_scale=True, desc=target.name)
                    bar.reset(total=total or None)
                    bar.update(have)
                with open(part, "ab" if resumed else "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        (reporter or bar).update(len(chunk))
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # the part is no prefix the server knows: start over
                part.unlink(missing_ok=True)
                tries += 1
                if tries < attempts:
                    continue
            raise UserError(f"config key 'model': downloading {url} failed: HTTP {error.code} {error.reason}") \
                from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # a cut connection too
            tries += 1
            size = part.stat().st_size if part.is_file() else 0
            if tries >= attempts:
                reason = getattr(error, "reason", None) or error
                if not size and isinstance(error, urllib.error.URLError):
                    raise UserError(f"config key 'model': {url} is not downloaded and the machine is offline (it "
                                    f"cannot be reached: {reason})") from None
                raise UserError(f"config key 'model': downloading {url} failed after {tries} tries: {reason}"
                                f"{_kept(size)}") from None
            if size <= have:  # no progress: wait a little before the next try
                time.sleep(tries)
            continue
        size = part.stat().st_size
        if total and size < total:
            tries += 1
            if tries >= attempts:
                raise UserError(f"config key 'model': downloading {url} stopped at {size} of {total} bytes after "
                                f"{tries} tries{_kept(size)}")
            continue
        break
    if bar is not None:
        bar.close()
    if reporter is not None:
        reporter.tell("downloaded")
    os.replace(part, target)


def _kept(size: int) -> str:
    return f" ({_size(size)} are kept and resumed on the next start)" if size else ""


_verified: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        _verified[key] = digest.hexdigest()
    return _verified[key]


def _check_format(expected: Optional[str]) -> None:
    if expected is not None and not _SHA256.match(expected):
        raise UserError(f"config key 'model_sha256': expected 64 hexadecimal digits, got {expected!r}")


def check_sha256(path: Path, expected: str, remove: bool) -> None:
    """Refuse a file whose SHA-256 is not expected; a downloaded one (remove) is deleted so that the next
    start downloads it again."""
    _check_format(expected)
    actual = file_sha256(path)
    if actual != expected.lower():
        if remove:
            path.unlink(missing_ok=True)
        removed = " (the download was removed)" if remove else ""
        raise UserError(f"config key 'model_sha256': {path.name} has SHA-256 {actual}, not {expected.lower()}"
                        f"{removed}")
