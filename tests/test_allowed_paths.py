"""Where a shared app (--listen, --share) may read and write (scal_gui/allowed.py): the policy itself, every
path key of the schema checked, the refusals through the actions, the page's API and the results downloads,
and the --max-upload-mb flag."""
import os
import types
import typing
from pathlib import Path

import pytest

from engine import config as schema
from engine.errors import UserError
from engine.testing import tiny_config
from scal_gui import configs, datasets, fields, results, server, tab_dataset, tab_train
from scal_gui.actions import Actions
from scal_gui.allowed import PathPolicy
from scal_gui.jobs import JobManager
from test_results import RUN, make_run

# String-holding keys of the schema that do not name a file or folder, each with why. A new key that holds a
# string must be marked PATH / MODEL_PATH in engine/config.py (and is then checked) or be listed here.
NOT_PATHS = {
    "model_sha256": "a digest", "project": "a name (validate refuses separators)", "description": "text",
    "data.concepts[].instance_set.prompt": "text", "data.concepts[].class_set.prompt": "text",
    "data.concepts[].class_set.auto_generate.negative_prompt": "text", "sampling.concepts[].prompt": "text",
    "sampling.concepts[].negative_prompt": "text", "validation.prompt": "text", "trainer.precision": "a name",
    "trainer.devices": "device numbers", "optimizer.name": "a class path", "optimizer.lr_scheduler.name": "a name",
    "optimizer.lr_scheduler.params": "the scheduler's numbers",
    "loggers.wandb": "W&B's entity, name, tags, notes, group, mode (its folder is the run's)",
    "loggers.tensorboard": "no option is read (its folder is the run's)",
}


def holds_text(tp) -> bool:
    """Whether a schema annotation can hold a string (str, Optional[str], a union with str, a dict)."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if tp in (str, dict) or typing.get_origin(tp) is dict:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(
        holds_text(arg) for arg in typing.get_args(tp))


@pytest.fixture
def place(tmp_path):
    """The app's folders (data, output, a model folder, an allowed folder), one outside, and the policy."""
    folders = {name: tmp_path / name for name in ("data", "output", "models", "extra", "outside")}
    for folder in folders.values():
        folder.mkdir()
    policy = PathPolicy.shared(folders["data"], str(folders["output"]), [str(folders["models"])],
                               [str(folders["extra"])])
    return folders, policy


def config_with(output: Path, key: str, value: str) -> dict:
    """The tiny demo config writing into output, with key set to value."""
    values = tiny_config(output)
    schema.apply_override(values, key, value)
    return values


def refusal(policy: PathPolicy, what: str, value: str, model: bool = False) -> str:
    with pytest.raises(UserError) as caught:
        policy.check(what, value, model=model)
    return str(caught.value)


# -- the policy --------------------------------------------------------------------------------------------
def test_inside_passes_and_outside_dotdot_and_a_symlink_out_are_refused(place):
    folders, policy = place
    for name in ("data", "output", "models", "extra"):
        policy.check("config key 'output_dir'", str(folders[name] / "new" / "file.safetensors"))
    (folders["data"] / "cats").mkdir()
    policy.check("config key 'output_dir'", str(folders["data"] / "cats" / ".." / "cats"))

    message = refusal(policy, "config key 'output_dir'", str(folders["outside"] / "run"))
    assert message.startswith("config key 'output_dir': ") and str(folders["outside"] / "run") in message
    assert "--allow-path DIR" in message and "\n" not in message
    escaped = str(folders["output"] / ".." / "outside")
    assert str(folders["outside"]) in refusal(policy, "config key 'output_dir'", escaped)
    (folders["data"] / "link").symlink_to(folders["outside"])
    assert str(folders["outside"] / "x") in refusal(policy, "Convert output", str(folders["data"] / "link" / "x"))
    # a model key names the model flag too
    assert "--model-dir DIR" in refusal(policy, "config key 'model'", str(folders["outside"]), model=True)


def test_hub_ids_urls_and_demo_names_are_not_paths(place, demo_cache):
    folders, policy = place
    for model in ("stabilityai/stable-diffusion-xl-base-1.0", "org/name@main/unet/w.safetensors",
                  "https://example.com/m.safetensors"):
        policy.check("config key 'model'", model, model=True)
    policy.check("config key 'model'", "demo:tiny-sd", model=True)
    policy.check("config key 'data.concepts[0].instance_set.path'", "demo:sample-data/instance")
    # a demo: name is a folder of the app's cache: it cannot climb out of it
    assert "demo:../../etc" in refusal(policy, "config key 'vae'", "demo:../../etc")
    # only `model` takes a Hub id: elsewhere org/name is a folder relative to the working directory
    assert "org/name" in refusal(policy, "config key 'vae'", "org/name")


def test_shard_patterns_are_checked_name_by_name(place):
    folders, policy = place
    policy.check("config key 'data.concepts[0].instance_set.path'", str(folders["data"] / "s-{000..009}.tar"))
    escaping = str(folders["data"]) + "/{a,../../outside}/s.tar"
    assert "outside" in refusal(policy, "config key 'data.concepts[0].instance_set.path'", escaping)
    # braces that are no pattern are a name like any other: the folder made of it can be climbed out of
    unbalanced = str(folders["output"]) + "/{/../../outside/run"
    assert "outside" in refusal(policy, "config key 'output_dir'", unbalanced)


def test_a_local_app_names_any_path(tmp_path):
    PathPolicy.local().check("config key 'output_dir'", "/")
    PathPolicy.local().check_config(schema.from_dict(tiny_config(tmp_path / "anywhere")))


# -- every path key of the schema ----------------------------------------------------------------------------
def test_every_key_that_holds_text_is_a_path_key_or_known_not_to_be_one():
    text_keys = {path for path, tp in schema._leaves() if holds_text(tp)}
    marked = set(schema.path_keys())
    assert marked <= text_keys
    assert text_keys - marked == set(NOT_PATHS), "mark the new key PATH in engine/config.py or list it here"
    assert {"model", "vae", "output_dir", "data.concepts[].class_set.path", "network.init_from"} <= marked


@pytest.mark.parametrize("key", sorted(schema.path_keys()))
def test_each_path_key_set_outside_is_refused_naming_it(key, place):
    folders, policy = place
    outside = str(folders["outside"] / "x")
    config = schema.from_dict(config_with(folders["output"], key.replace("[]", "[0]"), outside))
    with pytest.raises(UserError) as caught:
        policy.check_config(config)
    assert str(caught.value).startswith(f"config key '{key.replace('[]', '[0]')}': {outside} ")


def test_a_config_inside_the_app_folders_passes(place):
    folders, policy = place
    config = schema.from_dict(tiny_config(folders["output"], **{"validation.path": str(folders["extra"]),
                                                                  "network.init_from": str(folders["models"] / "a")}))
    policy.check_config(config)
    keys = [key for key, _, _ in schema.path_values(config)]
    assert keys[:2] == ["model", "output_dir"] and "data.concepts[0].instance_set.path" in keys
    assert "validation.path" in keys and "network.init_from" in keys


# -- the actions -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["output_dir", "model", "data.concepts[0].instance_set.path"])
def test_training_with_an_outside_path_is_refused_and_writes_nothing(key, place):
    folders, policy = place
    target = folders["outside"] / "target"
    actions = Actions(JobManager(), policy=policy)
    yaml_text = configs.to_yaml(config_with(folders["output"], key, str(target)))
    for message in (actions.start_training(yaml_text), actions.generate_class_images(yaml_text)):
        assert message.startswith(f"Not started: config key '{key}': {target} ") and "\n" not in message
    assert actions.estimate_vram(yaml_text).startswith(f"Error: config key '{key}': ")
    assert actions.fit_memory(yaml_text, 8, 32)[0].startswith(f"Error: config key '{key}': ")
    assert actions.manager.snapshot() is None
    assert list(folders["outside"].iterdir()) == [] and list(folders["output"].iterdir()) == []


def test_resume_and_convert_outside_are_refused(place):
    folders, policy = place
    actions = Actions(JobManager(), policy=policy)
    message = actions.resume_training(str(folders["outside"]))
    assert message.startswith(f"Not started: the run to resume: {folders['outside']} ")
    out = folders["outside"] / "model.safetensors"
    message = actions.convert(str(folders["output"]), str(out), {})
    assert message.startswith(f"Error: Convert output: {out} ") and "--allow-path" in message
    assert actions.convert(str(folders["outside"]), str(folders["output"] / "m.safetensors"), {}).startswith(
        "Error: Convert source: ")
    assert list(folders["outside"].iterdir()) == [] and actions.manager.snapshot() is None


def test_the_preview_and_the_run_lists_keep_to_the_policy(place):
    folders, policy = place
    outside_run = make_run(folders["outside"])
    raw = tiny_config(folders["output"], **{"data.concepts[0].instance_set.path": str(folders["outside"])})
    message, *_ = tab_dataset.preview(configs.to_yaml(raw), *fields.form_values(raw, fields.ALL), policy=policy)
    assert message.startswith("Error: config key 'data.concepts[0].instance_set.path': ")
    assert tab_train.resume_choices(str(folders["outside"]), None, policy) == []
    assert tab_train.resume_choices(str(folders["outside"]))  # a local app lists them
    assert outside_run.is_dir()


def test_the_check_line_of_a_shared_page_says_nothing_of_what_exists_outside(place):
    folders, policy = place
    (folders["outside"] / "present").mkdir()
    key = "data.concepts[0].instance_set.path"
    lines = {}
    for name in ("present", "absent"):
        raw = config_with(folders["output"], key, str(folders["outside"] / name))
        lines[name] = [configs.check_message(raw, policy), configs.form_from_yaml(configs.to_yaml(raw), policy)[1],
                       configs.merge_form(configs.to_yaml(raw), fields.form_values(raw, fields.ALL), policy)[1]]
        assert all(line == lines[name][0] for line in lines[name])
    assert lines["present"][0].replace("present", "absent") == lines["absent"][0]
    assert lines["absent"][0].startswith(f"Error: config key '{key}': ") and "outside the folders" in lines["absent"][0]
    # a local app says which one is missing
    raw = config_with(folders["output"], key, str(folders["outside"] / "absent"))
    assert "not found" in configs.check_message(raw)


# -- results downloads and uploads --------------------------------------------------------------------------
def test_results_keep_to_the_policy_and_the_size_limit(place):
    folders, policy = place
    make_run(folders["outside"])
    with pytest.raises(results.Refused, match="outside the folders this shared app may use"):
        results.run_files(str(folders["outside"]), RUN, policy)
    run = make_run(folders["output"])
    files = results.run_files(str(folders["output"]), RUN, policy, max_bytes=1000)
    assert files.adapter is None and files.metrics is not None  # the 4 KiB adapter is over, metrics are not
    assert len(files.refused) == 1 and "over the download limit of 1000 bytes (--max-upload-mb)" in files.refused[0]
    with pytest.raises(results.Refused, match="over the download limit"):
        results.zip_samples(str(folders["output"]), RUN, policy, max_bytes=100)
    assert results.run_files(str(folders["output"]), RUN, policy).adapter is not None
    assert run.is_dir()


def test_the_upload_limit_reaches_the_dataset_uploads(tmp_path):
    upload = tmp_path / "a.png"
    upload.write_bytes(b"\x89PNG" + os.urandom(2000))
    message, _ = tab_dataset.add_uploads(tmp_path / "data", "set", [str(upload)], max_upload_bytes=1000)
    assert message.startswith("Error: the upload is 2004 bytes, over the limit of 1000 bytes")
    assert not (tmp_path / "data").exists()


# -- the flags and the page's API ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, words", [("0", "at least 1 megabyte"), ("-5", "at least 1 megabyte"),
                                          ("lots", "whole number of megabytes")])
def test_a_bad_upload_limit_is_refused_in_one_line(value, words, capsys):
    with pytest.raises(SystemExit) as exited:
        server.build_parser().parse_args(["--max-upload-mb", value])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max-upload-mb" in error and words in error


def test_the_flags_reach_the_launch_and_the_page(tmp_path, monkeypatch):
    import scal_gui.page
    from scal_gui.testing import free_port
    from test_app_flags import StartedPage

    pages = []
    monkeypatch.setattr(scal_gui.page, "build_page", lambda **built: pages.append(StartedPage(**built)) or pages[-1])
    monkeypatch.delenv("SCAL_AUTH", raising=False)
    (tmp_path / "models").mkdir()
    assert server.main(["--listen", "--auth", "u:p", "--port", str(free_port()), "--max-upload-mb", "5",
                        "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                        "--model-dir", str(tmp_path / "models")]) == 0
    [page] = pages
    assert server.DEFAULT_MAX_UPLOAD_MB * 2**20 == datasets.MAX_UPLOAD_BYTES
    assert page.launched["max_file_size"] == 5 * 2**20 and page.built["max_upload_bytes"] == 5 * 2**20
    policy = page.built["policy"]
    assert policy.restricted and {tmp_path / "out", tmp_path / "data", tmp_path / "models"} <= set(policy.roots)
    assert server.main(["--port", str(free_port())]) == 0
    assert not pages[-1].built["policy"].restricted  # a local app
    with pytest.raises(SystemExit):
        server.build_parser().parse_args(["--allow-path", str(tmp_path / "missing")])


def test_the_api_of_a_shared_page_refuses_an_outside_path(place):
    from gradio_client import Client

    from scal_gui.convert_options import AUTO_FORMAT
    from scal_gui.page import build_page
    from scal_gui.testing import free_port

    folders, policy = place
    page = build_page(output_dir=str(folders["output"]), data_dir=str(folders["data"]), policy=policy)
    page.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(page.local_url, verbose=False)
        out = folders["outside"] / "model.safetensors"
        message = client.predict(str(folders["output"]), str(out), True, True, False, False, "fp32", "fp32", "fp32",
                                 AUTO_FORMAT, "kohya", api_name="/convert")
        assert message.startswith(f"Error: Convert output: {out} ")
        yaml_text = configs.to_yaml(tiny_config(folders["outside"] / "runs"))
        message = client.predict(yaml_text, api_name="/start_training")
        assert message.startswith(f"Not started: config key 'output_dir': {folders['outside'] / 'runs'} ")
    finally:
        page.close()
    assert list(folders["outside"].iterdir()) == []
