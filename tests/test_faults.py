"""Faults that must not end a run or show a traceback: a side task (W&B, TensorBoard) that fails is a
warning and the run goes on; a user's mistake (an output path, a config value, a flag) is one error line."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_cli
from engine import config as cfg
from engine import events, paths
from engine.errors import UserError
from engine.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_values(output_dir, **overrides):
    """A short tiny-model run without class images, sampling or a mid-run checkpoint."""
    return tiny_config(output_dir, **{
        "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "trainer.max_steps": 3, "sampling.interval_steps": 0, **overrides})


def train_in_process(values):
    from engine.train import Trainer

    seen = []
    trainer = Trainer(cfg.from_dict(values), on_event=seen.append)
    result = trainer.run()
    warnings = [e.message for e in seen if isinstance(e, events.Log) and e.level == "warning"]
    steps = [json.loads(line)["step"] for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, warnings, steps


def error_lines(stderr):
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def train_cli(tmp_path, **overrides):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_values(tmp_path / "out", **{"trainer.max_steps": 1, **overrides})))
    return run_cli("train", "--config", str(config_file))


def test_loggers_that_cannot_start_are_warnings_and_the_run_goes_on(tmp_path, sample_data, monkeypatch):
    from engine.run_dir import RunDir

    create = RunDir.create.__func__

    def create_with_a_file_in_the_way(cls, output_dir, project):
        # A regular file where TensorBoard's folder goes, as a leftover or a mistyped path would leave it.
        run = create(cls, output_dir, project)
        (run.path / "tensorboard").write_text("not a folder")
        return run

    monkeypatch.setattr(RunDir, "create", classmethod(create_with_a_file_in_the_way))
    result, warnings, steps = train_in_process(run_values(tmp_path, **{
        "loggers.wandb": {"mode": "bogus"}, "loggers.tensorboard": {}}))
    assert isinstance(result, events.Finished) and result.step == 3, result
    assert steps == [1, 2, 3]
    wandb = [w for w in warnings if w.startswith("W&B logging is off for this run: it could not start")]
    assert len(wandb) == 1 and "'bogus'" in wandb[0] and "\n" not in wandb[0], warnings
    tensorboard = [w for w in warnings if w.startswith("TensorBoard logging is off for this run")]
    assert len(tensorboard) == 1 and "File exists" in tensorboard[0], warnings


def test_a_logger_failing_mid_run_is_one_warning_and_the_run_goes_on(tmp_path, sample_data, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    real = SummaryWriter.add_scalar

    def disk_full_from_step_two(self, tag, value, step):
        if step >= 2:
            raise OSError(28, "No space left on device")
        return real(self, tag, value, step)

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full_from_step_two)
    result, warnings, steps = train_in_process(run_values(tmp_path, **{"loggers.tensorboard": {}}))
    assert isinstance(result, events.Finished) and result.step == 3, result
    assert steps == [1, 2, 3]
    failed = [w for w in warnings if "No space left on device" in w]
    assert len(failed) == 1 and failed[0].startswith("TensorBoard logging failed and is off from here on"), warnings


def test_convert_to_a_path_through_a_file_is_one_error_line(tmp_path, tiny_model):
    (tmp_path / "file.txt").write_text("")
    out = tmp_path / "file.txt" / "out.safetensors"
    result = run_cli("convert", str(tiny_model), str(out))
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: {out}: cannot be written: {tmp_path / 'file.txt'} is a file, not a folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_into_a_read_only_folder_is_one_error_line(tmp_path, tiny_model):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = run_cli("convert", str(tiny_model), str(folder / "out.safetensors"))
    finally:
        folder.chmod(0o755)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: {folder / 'out.safetensors'}: cannot be written: {folder} is not writable (choose another output "
        "path)"]


def test_an_empty_tokenizer_folder_is_one_error_line(tmp_path, sample_data):
    (tmp_path / "empty").mkdir()
    result = train_cli(tmp_path, tokenizer=str(tmp_path / "empty"))
    assert result.returncode != 0
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: config key 'tokenizer': {tmp_path / 'empty'} holds no CLIP tokenizer"), line


def test_an_init_from_that_is_no_safetensors_file_is_one_error_line(tmp_path, sample_data):
    not_safetensors = tmp_path / "adapter.safetensors"
    not_safetensors.write_text("a text file under an adapter's name")
    result = train_cli(tmp_path, **{"network.type": "lora", "network.rank": 2, "network.alpha": 2.0,
                                    "network.init_from": str(not_safetensors)})
    assert result.returncode != 0
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: config key 'network.init_from': {not_safetensors} is not a .safetensors "
                           "adapter file"), line


def test_an_out_of_range_port_is_refused_by_the_flag_parser():
    result = subprocess.run([sys.executable, "app.py", "--port", "-1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["python app.py: error: argument --port: expected a port number from 1 to 65535, got -1"]


def test_a_single_file_with_an_empty_tokenizer_folder_is_one_line_naming_the_key(tmp_path):
    from engine.models.convert import convert_checkpoint
    from engine.models.single_file import load_single_file_components

    model = convert_checkpoint(paths.demo_model_dir(), tmp_path / "model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^config key 'tokenizer': .*empty holds no CLIP tokenizer"):
        load_single_file_components(model, tokenizer=str(tmp_path / "empty"))


@pytest.mark.parametrize("mistake", [{"data.concepts[0].instance_set.path": "/nowhere/images"},
                                     {"vae": "/nowhere/vae"}], ids=["instance-folder", "vae"])
def test_a_start_refused_for_a_missing_path_leaves_no_run_folder(mistake, tmp_path):
    from engine.train import Trainer

    values = tiny_config(tmp_path / "out", **{"trainer.max_steps": 1, **mistake})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Failed) and result.user_error
    (key,) = mistake
    assert result.error.startswith(f"config key '{key}'") and "\n" not in result.error
    assert not [path for path in (tmp_path / "out").rglob("*") if path.is_file()]


def test_the_pages_check_names_a_missing_model_or_folder_before_start(tmp_path):
    from scal_gui import configs

    raw = yaml.safe_load((ROOT / "presets" / "lora-4gb.yaml").read_text())
    raw["model"] = str(tmp_path / "no-such-model")
    assert configs.check_message(raw) == f"Error: config key 'model': not found: {tmp_path / 'no-such-model'}"
    raw["model"] = "runwayml/stable-diffusion-v1-5"  # a Hub id: downloaded at Start, not a missing path
    assert configs.check_message(raw).startswith("Error: config key 'data.concepts[0].instance_set.path'")
    raw["model"] = "demo:tiny-sd"
    assert configs.check_message(raw).startswith("Error: config key 'data.concepts[0].instance_set.path': not "
                                                 "found: data/instance")
    raw["data"]["concepts"][0]["instance_set"]["path"] = "demo:sample-data/instance"
    assert configs.check_message(raw).startswith("The config is valid.")  # the class folder is generated
    raw["data"]["concepts"][0]["class_set"]["auto_generate"]["enabled"] = False
    assert configs.check_message(raw).startswith("Error: config key 'data.concepts[0].class_set.path'")
