"""Base models from the Hugging Face Hub or a URL (engine/hub.py through sd.resolve_model_path), against a
local server on 127.0.0.1 that speaks the part of the Hub's API huggingface_hub uses: never the internet."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from engine import events, hub
from engine.errors import UserError
from engine.models.sd import resolve_model_path

REPO = "tiny-org/tiny-sd"
MAIN, V1 = "a" * 40, "b" * 40
# Files a published diffusers repo holds beside what the engine loads: none of them may be fetched.
UNWANTED = {"unet/diffusion_pytorch_model.fp16.safetensors": b"fp16 variant",
            "unet/diffusion_pytorch_model.bin": b"pickle",
            "text_encoder/model.fp16.safetensors": b"fp16 variant",
            "text_encoder/model.onnx": b"onnx",
            "vae/diffusion_pytorch_model.msgpack": b"flax",
            "v1-5-pruned.ckpt": b"original checkpoint",
            "safety_checker/model.safetensors": b"not in model_index",
            "README.md": b"# tiny"}


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos: dict[str, dict] = {}   # repo -> {"refs": {name: commit}, "files": {commit: {path: bytes}}}
        self.urls: dict[str, bytes] = {}   # plain download path -> bytes
        self.cut_first_get = True          # the first whole GET of a URL stops halfway
        self.log: list[tuple[str, str, str]] = []  # (method, path, Range header)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def resolved(self) -> list[str]:
        """The repo files requested through /resolve/, in order."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for _, path, _ in self.log if "/resolve/" in path]


class Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def fail(self, status: int, code: str):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def revision(self, repo: str, rev: str):
        """(the repo's entry, the commit a revision names), or None once a 404 is sent."""
        if repo not in self.server.repos:
            return self.fail(404, "RepoNotFound")
        entry = self.server.repos[repo]
        commit = entry["refs"].get(rev, rev if rev in entry["files"] else None)
        if commit is None:
            return self.fail(404, "RevisionNotFound")
        return entry, commit

    def json(self, value, body: bool):
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def answer(self, body: bool):
        path = unquote(urlparse(self.path).path)
        self.server.log.append((self.command, path, self.headers.get("Range", "")))
        if path in self.server.urls:
            return self.send_bytes(self.server.urls[path], body, cut=self.server.cut_first_get)
        if path.startswith("/api/models/"):
            parts = path[len("/api/models/"):].split("/") + ["revision", "main"]  # no revision: main
            repo, kind, rev = "/".join(parts[:2]), parts[2], parts[3]
            found = self.revision(repo, rev)
            if found is None:
                return None
            entry, commit = found
            files = entry["files"][commit]
            if kind == "revision":
                return self.json({"id": repo, "sha": commit, "siblings": [{"rfilename": name} for name in files]},
                                 body)
            return self.json([{"type": "file", "path": name, "size": len(data),
                               "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()], body)
        if "/resolve/" in path:
            repo, rest = path[1:].split("/resolve/", 1)
            rev, name = rest.split("/", 1)
            found = self.revision(repo, rev)
            if found is None:
                return None
            entry, commit = found
            if name not in entry["files"][commit]:
                return self.fail(404, "EntryNotFound")
            return self.send_bytes(entry["files"][commit][name], body, commit=commit)
        self.fail(404, "NotFound")

    def send_bytes(self, data: bytes, body: bool, commit: str = "", cut: bool = False):
        start = 0
        wanted = self.headers.get("Range")
        if wanted:
            start = int(wanted.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if not body:
            return
        if cut and not wanted:
            self.server.cut_first_get = False
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    from engine.models.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(folder, arch="sd")
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def server(tiny_files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub_server = Hub()
    thread = threading.Thread(target=hub_server.serve_forever, daemon=True)
    thread.start()
    main = {**tiny_files, **UNWANTED}
    v1 = {**main, "scheduler/scheduler_config.json":
          json.dumps({**json.loads(tiny_files["scheduler/scheduler_config.json"]), "steps_offset": 7}).encode()}
    hub_server.repos[REPO] = {"refs": {"main": MAIN, "v1": V1}, "files": {MAIN: main, V1: v1}}
    hub_server.repos["tiny-org/single"] = {"refs": {"main": MAIN}, "files": {MAIN: {
        "weights/model.safetensors": b"0123456789" * 1000, "README.md": b"# single"}}}
    # huggingface_hub reads its environment once, at import: the variables for anything started from here,
    # the module constants for this process.
    settings = {"HF_ENDPOINT": hub_server.endpoint, "HF_HOME": str(tmp_path / "hf"),
                "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1", "SCAL_SDT_CACHE": str(tmp_path / "cache"), "NO_PROXY": "127.0.0.1",
                "no_proxy": "127.0.0.1"}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", settings["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", settings["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    yield hub_server
    hub_server.shutdown()
    hub_server.server_close()


def go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def one_line_naming(error: UserError, key: str) -> str:
    message = str(error)
    assert message.startswith(f"config key '{key}': ") and "\n" not in message, message
    return message


def test_a_hub_id_downloads_only_what_loads_then_resolves_from_the_cache(server, tiny_files):
    from engine.models.sd import load_components

    said = []
    with hub.report_to(said.append):
        folder = Path(resolve_model_path(REPO))
    assert folder.is_dir() and folder.parent.name == "snapshots" and folder.name == MAIN
    assert str(folder).startswith(os.environ["HF_HUB_CACHE"])  # huggingface_hub's cache, where HF_HOME says
    requested = server.resolved()
    assert sorted(set(requested)) == sorted(tiny_files)  # nothing of UNWANTED: no .bin/.onnx/.ckpt/fp16
    assert not [path for _, path, _ in server.log if "xet" in path.lower()]
    logs = [event.message for event in said if isinstance(event, events.Log)]
    size = hub._size(sum(len(data) for data in tiny_files.values()))
    assert logs and logs[-1] == f"downloaded {REPO}: {size} of {size} (100%)"

    server.log.clear()
    components = load_components(REPO)  # a second resolve inside: the cache, not a single request
    assert components.model_path == str(folder) and components.unet is not None
    assert server.log == []


def test_offline_a_downloaded_model_resolves_and_a_missing_one_is_one_line(server, monkeypatch):
    folder = resolve_model_path(REPO)
    server.log.clear()
    go_offline(monkeypatch)
    assert resolve_model_path(REPO) == folder
    with pytest.raises(UserError) as refused:
        resolve_model_path("tiny-org/other-model")
    message = one_line_naming(refused.value, "model")
    assert message.startswith("config key 'model': not found: tiny-org/other-model: no such local path, and the "
                              "Hugging Face Hub model tiny-org/other-model is not downloaded and the machine is "
                              "offline (HF_HUB_OFFLINE is set)")
    with pytest.raises(UserError, match="not downloaded and the machine is offline"):
        resolve_model_path(f"{REPO}@v1")  # another revision is another download
    assert server.log == []


def test_an_unreachable_hub_is_offline_too(server, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(time, "sleep", lambda seconds: 1 / 0)  # no retries: one failed request is enough

    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(UserError) as refused:
        resolve_model_path(REPO)
    assert "is not downloaded and the machine is offline (the Hugging Face Hub cannot be reached)" in \
        one_line_naming(refused.value, "model")


def test_a_revision_fetches_that_commit(server):
    main = Path(resolve_model_path(REPO))
    tagged = Path(resolve_model_path(f"{REPO}@v1"))
    assert tagged.name == V1 and main.name == MAIN
    config = json.loads((tagged / "scheduler" / "scheduler_config.json").read_text())
    assert config["steps_offset"] == 7
    assert any(f"/resolve/{V1}/" in path for _, path, _ in server.log)
    with pytest.raises(UserError, match=r"^config key 'model': the Hugging Face Hub repo tiny-org/tiny-sd has no "
                                        r"revision 'v9'$"):
        resolve_model_path(f"{REPO}@v9")


def test_a_missing_local_path_shaped_like_a_hub_id_keeps_the_not_found_message(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as refused:
        resolve_model_path("data/x")
    assert one_line_naming(refused.value, "model").startswith("config key 'model': not found: data/x")
    # a local folder of that shape wins without asking the Hub
    server.log.clear()
    local = tmp_path / "tiny-org" / "tiny-sd"
    local.mkdir(parents=True)
    (local / "model_index.json").write_text("{}")
    assert resolve_model_path(REPO) == REPO and server.log == []
    # shapes that are never Hub ids
    for value in ("./data/x", "/abs/x", "a/b/c", "~/x/y", "../x/y"):
        assert hub.parse_hub_id(value) is None, value


def test_a_single_file_in_a_hub_repo_and_its_sha256(server):
    data = server.repos["tiny-org/single"]["files"][MAIN]["weights/model.safetensors"]
    good = hashlib.sha256(data).hexdigest()
    said = []
    with hub.report_to(said.append):
        path = resolve_model_path("tiny-org/single/weights/model.safetensors", good)
    assert said[-1].message == "downloaded tiny-org/single/weights/model.safetensors: 10.0 KB of 10.0 KB (100%)"
    assert Path(path).read_bytes() == data and server.resolved() == ["weights/model.safetensors"] * 2  # HEAD, GET
    with pytest.raises(UserError) as refused:
        resolve_model_path("tiny-org/single/weights/model.safetensors", "0" * 64)
    one_line_naming(refused.value, "model_sha256")
    with pytest.raises(UserError, match="^config key 'model': the Hugging Face Hub repo tiny-org/single has no "
                                        "model_index.json; it is not a diffusers model"):
        resolve_model_path("tiny-org/single")


def test_a_url_cut_off_halfway_resumes_with_a_range_request_and_is_checked(server):
    data = os.urandom(3_000_000)
    server.urls["/files/model.safetensors"] = data
    url = server.endpoint + "/files/model.safetensors"
    said = []
    with hub.report_to(said.append):
        path = Path(resolve_model_path(url, hashlib.sha256(data).hexdigest()))
    assert path.read_bytes() == data
    assert path.parent.parent == Path(os.environ["SCAL_SDT_CACHE"]) / "downloads"
    assert sorted(child.name for child in path.parent.iterdir()) == ["model.safetensors", "model.safetensors.lock"]
    gets = [(method, wanted) for method, _, wanted in server.log if method == "GET"]
    assert gets == [("GET", ""), ("GET", f"bytes={len(data) // 2}-")]
    assert said[-1].message.startswith(f"downloaded {url}: 3.0 MB of 3.0 MB (100%)")
    server.log.clear()
    assert resolve_model_path(url) == str(path) and server.log == []  # downloaded once


def test_a_url_with_a_wrong_sha256_is_removed_and_refused(server):
    server.cut_first_get = False
    server.urls["/files/other.safetensors"] = b"x" * 1000
    url = server.endpoint + "/files/other.safetensors"
    with pytest.raises(UserError) as refused:
        resolve_model_path(url, "ab" * 32)
    assert "(the download was removed)" in one_line_naming(refused.value, "model_sha256")
    downloads = Path(os.environ["SCAL_SDT_CACHE"]) / "downloads"
    assert not [path for path in downloads.rglob("other.safetensors*") if not path.name.endswith(".lock")]
    with pytest.raises(UserError, match="^config key 'model_sha256': expected 64 hexadecimal digits"):
        resolve_model_path(url, "abc")


def test_a_url_while_offline_or_not_safetensors_is_one_line(server, monkeypatch):
    with pytest.raises(UserError, match=r"^config key 'model': a URL must name a \.safetensors file"):
        resolve_model_path(server.endpoint + "/files/model.ckpt")
    go_offline(monkeypatch)
    with pytest.raises(UserError, match="^config key 'model': .* is not downloaded and the machine is offline"):
        resolve_model_path(server.endpoint + "/files/model.safetensors")
    assert server.log == []


def test_a_run_downloads_with_progress_in_its_events_or_is_refused_in_one_line(server, tmp_path):
    """Inside a job the download's progress lines are the job's log events (through its notices sink), and a
    model the Hub does not have stops the start in one line, before any run folder."""
    from engine import config as cfg
    from engine.testing import tiny_config
    from engine.train import Trainer

    from engine import notices

    said = []
    server.cut_first_get = False
    server.urls["/files/run.safetensors"] = b"y" * 5000
    with notices.collect(said.append):
        resolve_model_path(server.endpoint + "/files/run.safetensors")
    assert said[-1] == f"downloaded {server.endpoint}/files/run.safetensors: 5.0 KB of 5.0 KB (100%)"
    assert all(line.startswith("download") for line in said)

    values = tiny_config(tmp_path / "out", **{"trainer.max_steps": 1, "model": "tiny-org/no-such-model"})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Failed) and result.user_error
    assert result.error.startswith("config key 'model': not found: tiny-org/no-such-model") and "\n" not in result.error
    assert not [path for path in (tmp_path / "out").rglob("*") if path.is_file()]


def test_a_captioning_model_by_hub_id_fetches_its_files_and_captions(server, tmp_path):
    from PIL import Image

    from engine.captioning import CaptionJob, CaptionOptions
    from engine.models.tiny_captioners import make_tiny_captioner

    tagger = make_tiny_captioner(tmp_path / "wd14", "wd14")
    files = {path.name: path.read_bytes() for path in tagger.iterdir()}
    server.repos["tiny-org/tagger"] = {"refs": {"main": MAIN}, "files": {MAIN: {
        **files, "README.md": b"# tagger", "pytorch_model.bin": b"pickle"}}}
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(images / "a.png")
    result = CaptionJob(CaptionOptions(model="tiny-org/tagger", path=str(images))).run()
    assert isinstance(result, events.Finished) and result.summary["captioned"] == 1
    assert (images / "a.txt").read_text(encoding="utf-8").strip()
    assert sorted(set(server.resolved())) == sorted(files)  # not the README, not the pickle
