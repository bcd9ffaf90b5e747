"""Resume under faults: --set on resume, two processes on one run folder, a kill while metrics.jsonl is
rewritten, a damaged newest checkpoint, a full disk during a checkpoint write."""
import builtins
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, run_cli
from engine import checkpoints, events
from engine import config as cfg
from engine.config import ConfigError
from engine.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEP_3, STEP_6 = "step-00000003", "step-00000006"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def values(output_dir, **overrides):
    """6 steps of the tiny demo (its warmup rises over 5 steps to lr 1e-3), a checkpoint every 3."""
    return tiny_config(output_dir, **{"trainer.max_steps": 6, "checkpoint.every_n_train_steps": 3,
                                      "checkpoint.save_top_k": -1, "sampling.interval_steps": 0, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, class_images, one_torch_thread):
    """A finished run with checkpoints at steps 3 and 6; tests work on copies of it."""
    from engine.train import Trainer

    trainer = Trainer(cfg.from_dict(values(tmp_path_factory.mktemp("trained"))))
    assert isinstance(trainer.run(), events.Finished)
    return trainer.run_dir


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# -- --set on resume ----------------------------------------------------------------------------------------

def test_a_resume_applies_a_new_rate_and_step_count_from_the_resumed_step(run):
    from engine.train import Trainer

    shutil.rmtree(run / "checkpoints" / STEP_6)  # resume from step 3, inside the 5-step warmup
    config_time = (run / "config.yaml").stat().st_mtime_ns
    resumed = Trainer.for_resume(str(run), overrides=["optimizer.params.lr=1e-5", "trainer.max_steps=8"])
    result = resumed.run()
    assert isinstance(result, events.Finished) and result.step == 8
    rates = [record["lr"] for record in metrics(run)]
    assert [record["step"] for record in metrics(run)] == list(range(1, 9))
    # steps 1-3 at the old warmup to 1e-3; from step 4 the same warmup rises to the new rate
    assert rates[:3] == pytest.approx([0.0, 2e-4, 4e-4])
    assert rates[3:] == pytest.approx([6e-6, 8e-6, 1e-5, 1e-5, 1e-5])
    # the run's config says what it now trains with, so that a later resume goes on with it
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optimizer"]["params"]["lr"] == 1e-5 and saved["trainer"]["max_steps"] == 8
    assert (run / "config.yaml").stat().st_mtime_ns == config_time  # still orders runs by their start


def test_resuming_a_finished_run_says_there_is_nothing_to_train(run):
    from engine.train import Trainer

    log = []
    result = Trainer.for_resume(str(run), on_event=log.append).run()
    assert isinstance(result, events.Finished) and result.step == 6
    said = [e.message for e in log if isinstance(e, events.Log) and "nothing to train" in e.message]
    assert said == ["the run has already trained its 6 steps: nothing to train; raise trainer.max_steps "
                    "(--set trainer.max_steps=N) to train it further"]
    assert [record["step"] for record in metrics(run)] == list(range(1, 7))


def test_a_resume_refuses_in_one_line_a_key_that_cannot_change(run):
    before = (run / "config.yaml").read_text()
    result = run_cli("train", "--resume", str(run), "--set", "optimizer.name=sgd")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "config key 'optimizer.name' cannot change on resume" in line

    from engine.train import Trainer

    with pytest.raises(ConfigError, match=r"config keys 'data.resolution', 'network.type' cannot change"):
        Trainer.for_resume(str(run), overrides=["network.type=lora", "data.resolution=128"])
    assert (run / "config.yaml").read_text() == before
    # setting a key to the value it has is no change
    assert Trainer.for_resume(str(run), overrides=["optimizer.name=torch.optim.AdamW"]).resume_changes == []


# -- one process per run folder -----------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from engine.run_dir import RunLock
lock = RunLock.acquire(sys.argv[1])  # held while this process lives
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_a_run_folder_until_its_holder_dies(run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_cli("train", "--resume", str(run))
        assert refused.returncode == 2
        (line,) = error_lines(refused.stderr)
        assert f"{run} is in use by process {holder.pid} on {socket.gethostname()}" in line
        assert "Traceback" not in refused.stderr
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock
        holder.wait(timeout=30)
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_a_resume_of_a_run_that_is_training_is_refused(tmp_path, class_images):
    from engine.train import Trainer

    second = []

    def resume_the_same_folder(event):
        if isinstance(event, events.Started) and not second:
            second.append(Trainer.for_resume(event.run_dir).run())

    result = Trainer(cfg.from_dict(values(tmp_path, **{"trainer.max_steps": 1})), on_event=resume_the_same_folder).run()
    assert isinstance(result, events.Finished)
    (refused,) = second
    assert isinstance(refused, events.Failed) and refused.user_error
    assert refused.error == (f"{result.run_dir} is in use by process {os.getpid()} on {socket.gethostname()}: a "
                             "run folder is trained by one process at a time; wait for that one to end or stop it")


# -- metrics.jsonl ------------------------------------------------------------------------------------------

def test_a_failure_while_metrics_are_rewritten_on_resume_keeps_the_history(tmp_path, monkeypatch):
    from engine.loggers import MetricsLog

    path = tmp_path / "metrics.jsonl"
    history = '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    path.write_text(history)
    real_open = io.open

    def open_for_a_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            def write(text):
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write  # the file is already opened (and emptied) when the write fails
        return handle

    monkeypatch.setattr(io, "open", open_for_a_full_disk)
    monkeypatch.setattr(builtins, "open", open_for_a_full_disk)
    with pytest.raises(OSError):
        MetricsLog(path, resume_step=2)
    monkeypatch.undo()
    assert path.read_text() == history


# -- damaged checkpoints ------------------------------------------------------------------------------------

# Each damages a checkpoint and returns what verification must say about it.
def damage_meta(checkpoint):
    (checkpoint / "meta.json").write_text('{"step": 6, "epo')
    return "meta.json is unreadable (JSONDecodeError)"


def damage_state(checkpoint):
    (checkpoint / "training_state.pt").unlink()
    return "training_state.pt is missing"


def damage_weights(checkpoint):
    weights = checkpoint / UNET_FILE
    size = weights.stat().st_size
    with open(weights, "r+b") as file:
        file.truncate(size - 100)
    return f"{UNET_FILE} is {size - 100} bytes where its header describes {size}"


@pytest.mark.parametrize("damage", [damage_meta, damage_state, damage_weights])
def test_a_damaged_checkpoint_fails_verification_and_is_never_called_last_good(run, damage):
    from engine.train import Trainer

    assert checkpoints.damage(run / "checkpoints" / STEP_6) is None
    why = damage(run / "checkpoints" / STEP_6)
    assert checkpoints.damage(run / "checkpoints" / STEP_6) == why
    assert checkpoints.damage(run / "checkpoints" / STEP_3) is None
    trainer = Trainer(cfg.from_dict(values(run.parent)))
    trainer.run_dir = run
    assert trainer.describe_failure("it failed") == (
        f"it failed (last good checkpoint: {run / 'checkpoints' / STEP_3}; continue with --resume {run})")


def test_a_resume_falls_back_past_a_damaged_newest_checkpoint_to_the_same_weights(run, trained):
    why = damage_weights(run / "checkpoints" / STEP_6)
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (f"warning: checkpoint {STEP_6} is damaged ({why}): resuming from an older one; it is kept as "
            f"damaged-{STEP_6}") in resumed.stderr
    assert [record["step"] for record in metrics(run)] == list(range(1, 7))
    assert (run / "checkpoints" / f"damaged-{STEP_6}").is_dir()
    assert [c.name for c in checkpoints.list_checkpoints(run)] == [STEP_3, STEP_6]
    expected, actual = (load_file(folder / "checkpoints" / STEP_6 / UNET_FILE) for folder in (trained, run))
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6


# -- a full disk --------------------------------------------------------------------------------------------

def fill_the_disk_at(call):
    """A torch.save that writes part of the file and then finds the disk full, at its call-th call."""
    original, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == call:
            with open(path, "wb") as file:
                file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, path, *args, **kwargs)

    return save


def folder_bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_full_disk_removes_the_partial_checkpoint_and_says_what_the_next_one_needs(tmp_path, class_images,
                                                                                    monkeypatch):
    from engine.train import Trainer

    monkeypatch.setattr(checkpoints.torch, "save", fill_the_disk_at(2))  # the second checkpoint's state
    result = Trainer(cfg.from_dict(values(tmp_path, **{"checkpoint.save_top_k": 1}))).run()
    assert isinstance(result, events.Failed) and result.user_error
    (run_dir,) = (tmp_path / "tiny-demo").iterdir()
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [STEP_3]  # no partial step-6 or .tmp-step-6
    need = folder_bytes(folder / STEP_3)  # the previous checkpoint: the next one is as large
    assert result.error.startswith(f"the disk is full: checkpoint {STEP_6} could not be written to {folder} (it "
                                   f"needs about {need / 2**20:.1f} MiB, ")
    assert f"(last good checkpoint: {folder / STEP_3}; continue with --resume {run_dir})" in result.error
    assert "\n" not in result.error


def test_the_first_checkpoint_on_a_full_disk_is_estimated_from_the_state(tmp_path):
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights and 2 KiB of bias

    class FailingWrite:
        def save_pretrained(self, folder):
            folder.mkdir(parents=True)
            (folder / "weights.bin").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        def state_dict(self):
            return model.state_dict()

    with pytest.raises(checkpoints.UserError, match=r"needs about 3\.0 MiB"):
        checkpoints.save_checkpoint(tmp_path, 1, {"unet": FailingWrite()}, {"moments": [torch.zeros(2**19)]}, {},
                                    keep=1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


FULL_DISK_IN_WRITE = """
import errno, sys
import engine.checkpoints as checkpoints
original, calls = checkpoints.torch.save, []
def save(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return original(obj, path, *args, **kwargs)
checkpoints.torch.save = save
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_ends_the_cli_with_one_line_and_no_traceback(tmp_path, class_images):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values(tmp_path)))
    result = subprocess.run([sys.executable, "-c", FULL_DISK_IN_WRITE, "train", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: the disk is full: checkpoint {STEP_6} could not be written")
    (run_dir,) = (tmp_path / "tiny-demo").iterdir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [STEP_3]
