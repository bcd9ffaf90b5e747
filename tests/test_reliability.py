"""Never lose a run: exact resume after SIGKILL, crash-safe checkpoint writes, NaN and OOM handling."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, kill_at_checkpoint, run_cli, run_torchrun, train_here
from engine.run_dir import RunDir
from engine import checkpoints, events
from engine import config as cfg
from engine.testing import tiny_config


def write_config(path, values):
    path.write_text(yaml.safe_dump(values))
    return path


def only_run(output_dir):
    (run,) = sorted(p for p in (output_dir / "tiny-demo").iterdir())
    return run


def final_unet(run_dir):
    newest = checkpoints.latest_checkpoint(run_dir)
    return load_file(newest / "unet" / "diffusion_pytorch_model.safetensors"), newest


def metric_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resume_values(output_dir, **overrides):
    return tiny_config(output_dir, **{"trainer.max_steps": 30, "checkpoint.every_n_train_steps": 5,
                                      "checkpoint.save_top_k": 2, "sampling.interval_steps": 10, **overrides})


# Qwen-Image-Edit: 8 pairs x 3 repeats (12 steps an epoch), no class images, its prompts not cached (they are read
# with the control images); its latent cache holds the 8 targets' and the 8 controls'. Its vision tower reads the
# controls at every step, so it trains 15 steps, 5 past the kill, and draws no samples.
EDIT = {"trainer.max_steps": 15, "sampling.interval_steps": 0, "prior_preservation.enabled": False,
        "data.concepts[0].instance_set.path": "demo:sample-data/edit", "data.concepts[0].class_set": None,
        "data.concepts[0].instance_set.prompt": "{TXT_PROMPT}", "cache.text_embeddings": False,
        "sampling.concepts[0].control_image": "demo:sample-data/edit/pair_00.control.png"}


# fsdp: two processes shard the Flux.1 transformer at batch 1 (the reference is one process at batch 2), are
# killed together and resume together from the checkpoint gathered into one process's layout.
# compile: the resumed run compiles its blocks again (from the kernels cached on disk) and the VAE encoder, which
# the first epoch runs to fill the latent cache.
@pytest.mark.parametrize("model,processes,more,epoch_steps,crops", [
    ("demo:tiny-sd", 1, {}, 15, 20), ("demo:tiny-flux", 1, {}, 15, 20), ("demo:tiny-qwen-image", 1, {}, 15, 20),
    ("demo:tiny-chroma", 1, {}, 15, 20), ("demo:tiny-z-image", 1, {}, 15, 20), ("demo:tiny-flux2-klein", 1, {}, 15, 20),
    ("demo:tiny-qwen-image-edit", 1, EDIT, 12, 16), ("demo:tiny-flux", 2, {}, 15, 20),
    ("demo:tiny-sd", 1, {"compile": True}, 15, 20)],
    ids=["demo:tiny-sd", "demo:tiny-flux", "demo:tiny-qwen-image", "demo:tiny-chroma", "demo:tiny-z-image",
         "demo:tiny-flux2-klein", "demo:tiny-qwen-image-edit", "fsdp", "compile"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(model, processes, more, epoch_steps, crops, tmp_path,
                                                         class_images):
    from engine.data.cache import ShardStore

    def values(output_dir, killed=False):
        # The first epoch writes the caches (10 images x 3 repeats: 15 steps), so the kill at step 10 lands
        # while they fill and the resumed run then switches to reading them, as the uninterrupted one does.
        # The frozen text encoder is stored in fp8.
        return resume_values(output_dir, **{
            "data.concepts[0].instance_set.repeats": 3, "cache.latents": True, "cache.text_embeddings": True,
            "base_dtype": "fp8", "model": model,
            "cache.fill": "first_epoch", "cache.dir": str(output_dir / "cache"), **more,
            **({"trainer.strategy": "fsdp", "batch_size": 1} if killed and processes > 1 else {})})

    def latents(output_dir):
        (folder,) = (output_dir / "cache").glob("latents-*")
        return ShardStore(folder)

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    train_here(values(reference_dir))

    kill_at_checkpoint(write_config(tmp_path / "b.yaml", values(killed_dir, killed=True)), "step-00000010", processes)
    run_dir = only_run(killed_dir)
    steps_before = metric_steps(run_dir)
    assert 10 <= steps_before[-1] < epoch_steps, "the kill must land within the first epoch"
    # The checkpoints wrote out what the steps before them encoded (far less than a 256 MiB shard).
    assert len(latents(killed_dir)) > 0 and len(latents(reference_dir)) == crops

    resumed = (run_cli("train", "--resume", str(run_dir)) if processes == 1 else
               run_torchrun(processes, "--resume", str(run_dir), timeout=600))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = values(reference_dir)["trainer"]["max_steps"]
    assert metric_steps(run_dir) == list(range(1, steps + 1))
    assert set(latents(killed_dir).keys()) == set(latents(reference_dir).keys())
    expected, expected_ckpt = final_unet(only_run(reference_dir))
    actual, actual_ckpt = final_unet(run_dir)
    assert expected_ckpt.name == actual_ckpt.name == checkpoints.checkpoint_name(steps)
    assert expected.keys() == actual.keys()
    worst = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst
    assert len(list((tmp_path / "killed" / "tiny-demo").iterdir())) == 1


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["demo:tiny-flux", "demo:tiny-sdxl"])
def test_sigkill_then_resume_with_block_swap_and_offloaded_activations_is_bit_exact(model, tmp_path):
    # A full fine-tune whose optimizer steps inside backward, so that the swapped blocks' trained weights
    # themselves wait on the CPU between steps, and the checkpointed blocks' inputs wait there between forward
    # and backward; the samples at step 6 move the swapped model to the device and back after the resume.
    def values(output_dir):
        return tiny_config(output_dir, **{
            "model": model, "trainer.max_steps": 12, "checkpoint.every_n_train_steps": 4,
            "checkpoint.save_top_k": 1, "sampling.interval_steps": 6, "prior_preservation.enabled": False,
            "gradient_checkpointing": True, "optimizer.fused_backward": True, "memory.blocks_on_cpu": 2,
            "memory.offload_activations": True})

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    train_here(values(reference_dir))
    kill_at_checkpoint(write_config(tmp_path / "b.yaml", values(killed_dir)), "step-00000004")
    run_dir = only_run(killed_dir)
    assert metric_steps(run_dir)[-1] < 12
    resumed = run_cli("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected_losses = losses(only_run(reference_dir))
    assert len(expected_losses) == 12 and losses(run_dir) == expected_losses
    expected, expected_ckpt = final_unet(only_run(reference_dir))
    actual, actual_ckpt = final_unet(run_dir)
    assert expected_ckpt.name == actual_ckpt.name == "step-00000012"
    assert expected.keys() == actual.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []


KILL_IN_WRITE = """
import os, signal, sys
import engine.checkpoints as checkpoints
original = checkpoints.torch.save
calls = []
def save_then_die(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:
        original(obj, path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, path, *args, **kwargs)
checkpoints.torch.save = save_then_die
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_inside_a_checkpoint_write_leaves_a_resumable_run(tmp_path, class_images):
    values = tiny_config(tmp_path, **{"trainer.max_steps": 12, "checkpoint.every_n_train_steps": 4,
                                      "sampling.interval_steps": 0})
    config_path = write_config(tmp_path / "c.yaml", values)
    killed = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, "train", "--config", str(config_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    run_dir = only_run(tmp_path)
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-step-00000008", "step-00000004"]
    assert checkpoints.latest_checkpoint(run_dir).name == "step-00000004"

    resumed = run_cli("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "removed an incomplete checkpoint: .tmp-step-00000008" in resumed.stderr
    assert not list(folder.glob(".tmp-*"))
    assert metric_steps(run_dir) == list(range(1, 13))


def test_save_top_k_keeps_the_newest_and_never_the_last_one(tmp_path):
    model = torch.nn.Linear(2, 2)

    class Saveable:
        def save_pretrained(self, folder):
            folder.mkdir(parents=True)
            torch.save(model.state_dict(), folder / "weights.pt")

    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path, step, {"unet": Saveable()}, {}, {}, keep=0)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-00000003"]
    for step in (4, 5, 6):
        checkpoints.save_checkpoint(tmp_path, step, {"unet": Saveable()}, {}, {}, keep=2)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]


def test_an_existing_run_folder_is_never_reused(tmp_path):
    first = RunDir.create(str(tmp_path), "p").path
    second = RunDir.create(str(tmp_path), "p").path
    assert first != second and first.is_dir() and second.is_dir()


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, class_images,
                                                                                   monkeypatch):
    import engine.step
    from engine.train import Trainer

    real_loss = engine.step.dreambooth_loss
    calls = []

    def loss_goes_nan_at_the_sixth_batch(*args):
        calls.append(1)
        loss, instance, prior = real_loss(*args)
        return (loss * float("nan") if len(calls) == 6 else loss), instance, prior

    monkeypatch.setattr(engine.step, "dreambooth_loss", loss_goes_nan_at_the_sixth_batch)
    values = tiny_config(tmp_path, **{"trainer.max_steps": 50, "checkpoint.every_n_train_steps": 2,
                                      "sampling.interval_steps": 0})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Failed) and result.user_error
    assert result.error.startswith("the loss became nan at step 6; stopping.")
    run_dir = only_run(tmp_path)
    assert [p.name for p in checkpoints.list_checkpoints(run_dir)][-1] == "step-00000004"
    assert f"(last good checkpoint: {run_dir / 'checkpoints' / 'step-00000004'}; continue with --resume" in result.error
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5]


def test_overflowing_fp16_steps_are_skipped_and_counted():
    from engine.step import optimizer_step

    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    model.weight.grad.fill_(float("inf"))
    assert optimizer_step(optimizer, scaler, list(model.parameters()), None) is False
    assert torch.equal(model.weight, before)
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    assert optimizer_step(optimizer, scaler, list(model.parameters()), None) is True
    assert not torch.equal(model.weight, before)


def test_out_of_memory_ends_the_run_with_advice_and_the_next_run_works(tmp_path, class_images, monkeypatch):
    from diffusers import UNet2DConditionModel

    from engine.train import Trainer

    values = tiny_config(tmp_path, **{"trainer.max_steps": 2, "sampling.interval_steps": 0})
    original = UNet2DConditionModel.forward

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(UNet2DConditionModel, "forward", out_of_memory)
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Failed) and result.user_error
    for advice in ("preset", "batch_size", "gradient_checkpointing", "AdamW8bit", "cached latents"):
        assert advice in result.error
    monkeypatch.setattr(UNet2DConditionModel, "forward", original)
    assert isinstance(Trainer(cfg.from_dict(values)).run(), events.Finished)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from engine.loggers import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 0.3})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def _until_first_step(process):
    for line in process.stdout:
        if line.startswith("{") and json.loads(line)["kind"] == "step":
            return
    pytest.fail(process.stderr.read()[-2000:])


def test_a_burst_of_ctrl_c_stops_a_json_events_run_with_a_checkpoint(tmp_path):
    """The app's Stop reaches a torchrun rank twice (from the app, then forwarded by torchrun) and at any
    point of its loop: however many arrive, the run stops after its step and saves a checkpoint."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **{
        "trainer.max_steps": 100000, "sampling.interval_steps": 0, "checkpoint.every_n_train_steps": 100000}))
    process = subprocess.Popen([sys.executable, "-m", "engine", "train", "--config", str(config), "--json-events"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _until_first_step(process)
        for _ in range(20):  # apart, or the process would see them as one
            process.send_signal(signal.SIGINT)
            time.sleep(0.005)
        rest = [json.loads(line) for line in process.stdout if line.startswith("{")]
        assert process.wait(120) == 0, process.stderr.read()[-2000:]
    finally:
        process.kill()
    final = rest[-1]
    assert final["kind"] == "finished" and final["stopped"], final
    (saved,) = [event for event in rest if event["kind"] == "checkpoint"]
    assert saved["step"] == final["step"] and checkpoints.latest_checkpoint(only_run(tmp_path)).name in saved["path"]


def test_a_second_ctrl_c_aborts_a_single_process_run_at_the_terminal(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **{
        "trainer.max_steps": 100000, "sampling.interval_steps": 0, "checkpoint.every_n_train_steps": 100000}))
    process = subprocess.Popen([sys.executable, "-m", "engine", "train", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pressed = False
        for line in process.stderr:  # where the progress bar and the messages go
            if "| 1/" in line and not pressed:  # the bar is drawn more than once at step 1
                process.send_signal(signal.SIGINT)
                pressed = True
            elif "stopping: saving a checkpoint (Ctrl+C again to abort)" in line:
                process.send_signal(signal.SIGINT)
                break
        assert process.wait(120) == 130
    finally:
        process.kill()
    assert "aborted: the newest checkpoint on disk is kept" in process.stderr.read()
