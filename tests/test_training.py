"""The training loop end to end on the tiny model, and the pieces of its loss."""
import json
import queue

import pytest
import torch
import yaml

from conftest import run_cli
from engine import config as cfg
from engine.testing import tiny_config


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_run(output_dir, project="tiny-demo"):
    runs = sorted((output_dir / project).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_tiny_demo_preset_trains_from_the_cli(tmp_path, class_images):
    result = run_cli("train", "--config", "presets/tiny-demo-cpu.yaml", "--set", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path)
    metrics = read_metrics(run_dir)
    assert len(metrics) >= 10
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    fifth = len(metrics) // 5
    first = sum(m["loss"] for m in metrics[:fifth]) / fifth
    last = sum(m["loss"] for m in metrics[-fifth:]) / fifth
    assert last < first, (first, last)
    assert all("prior_loss" in m for m in metrics)
    assert list(run_dir.glob("samples/*/*.png"))
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert checkpoints and (checkpoints[-1] / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed"] == 1234 and saved["output_dir"] == str(tmp_path)


def finetune_values(tmp_path, **overrides):
    return tiny_config(tmp_path, **{
        "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/finetune", "prompt": "{TXT_PROMPT}"}}],
        "trainer.max_steps": 12, "sampling.interval_steps": 6, "checkpoint.every_n_train_steps": 6,
        **overrides})


def test_native_finetune_trains_and_captions_reach_the_text_encoder(tmp_path, sample_data, tiny_model):
    from engine.models.sd import load_components
    from engine.data.prepare import prepare_data

    config = cfg.from_dict(finetune_values(tmp_path))
    components = load_components(config.model)
    data = prepare_data(config, components.tokenizer, seed=0)
    batch = next(iter(data.loader))
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["num_instance"] == 2 and batch["input_ids"].shape == (2, 77)
    for row, caption in zip(batch["input_ids"], batch["captions"]):
        assert " on a " in caption and ("black" in caption or "white" in caption)
        decoded = components.tokenizer.decode(row, skip_special_tokens=True)
        assert decoded.replace(" ", "") == caption.replace(" ", "")
    files = sorted((sample_data / "finetune").glob("*.txt"))
    captions = {f.read_text() for f in files}
    assert set(batch["captions"]) <= captions

    config_file = tmp_path / "finetune.yaml"
    config_file.write_text(yaml.safe_dump(finetune_values(tmp_path)))
    result = run_cli("train", "--config", str(config_file))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(only_run(tmp_path))
    assert len(metrics) == 12 and "prior_loss" not in metrics[0]


def test_prior_loss_enters_with_its_weight():
    from engine.losses import dreambooth_loss

    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    loss, instance, prior = dreambooth_loss(pred, target, num_instance=2, prior_loss_weight=0.5)
    hand_instance = ((pred[:2] - target[:2]) ** 2).mean()
    hand_prior = ((pred[2:] - target[2:]) ** 2).mean()
    assert torch.allclose(instance, hand_instance) and torch.allclose(prior, hand_prior)
    assert torch.allclose(loss, hand_instance + 0.5 * hand_prior)

    grads = []
    for weight in (0.0, 1.0):
        p = pred.clone().requires_grad_(True)
        dreambooth_loss(p, target, 2, weight)[0].backward()
        grads.append(p.grad)
    assert torch.equal(grads[0][:2], grads[1][:2])
    assert torch.count_nonzero(grads[0][2:]) == 0 and torch.count_nonzero(grads[1][2:]) > 0


def test_clip_skip_uses_the_penultimate_layer_through_the_final_norm(tiny_model):
    from engine.models.sd import encode_prompt, final_layer_norm, load_components

    components = load_components(str(tiny_model))
    encoder = components.text_encoder
    ids = components.tokenizer(["a sks toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        skip1 = encode_prompt(encoder, ids, 1)
        skip2 = encode_prompt(encoder, ids, 2)
        expected = final_layer_norm(encoder)(hidden[-2])
    assert torch.allclose(skip2, expected)
    assert torch.allclose(skip1, final_layer_norm(encoder)(hidden[-1]))
    assert not torch.allclose(skip1, skip2)


def test_adamw8bit_steps_on_cpu_and_changes_weights():
    from engine.config import Optimizer
    from engine.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    before = model.weight.detach().clone()
    optimizer_config = Optimizer(name="bitsandbytes.optim.AdamW8bit")
    optimizer = build_optimizer(optimizer_config, model.parameters(), lr=1e-2)
    assert type(optimizer).__name__ == "AdamW8bit"
    for _ in range(3):
        model(torch.randn(8, 64)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (model.weight - before).abs().max() > 1e-3


def test_lr_warmup_and_scaling_follow_the_config():
    from engine.config import Optimizer
    from engine.optim import build_optimizer, build_scheduler, scaled_lr

    values = {"name": "torch.optim.AdamW", "params": {"lr": 1e-4},
              "lr_scale": {"enabled": True, "method": "sqrt"},
              "lr_scheduler": {"name": "torch.optim.lr_scheduler.CosineAnnealingLR",
                               "params": {"T_max": 10, "eta_min": "1e-6", "last_epoch": -1},
                               "warmup": {"enabled": True, "init_lr": 1e-8, "steps": 4, "strategy": "constant"}}}
    optimizer_config = cfg._build(Optimizer, values, "optimizer")
    assert scaled_lr(optimizer_config, 4) == pytest.approx(2e-4)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(optimizer_config, model.parameters(), 2e-4)
    scheduler = build_scheduler(optimizer_config, optimizer, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == [pytest.approx(1e-8)] * 4
    assert lrs[4] == pytest.approx(2e-4)
    assert lrs[-1] < lrs[5] < lrs[4]


def test_stop_from_another_thread_ends_within_a_step_and_resume_continues(tmp_path, class_images):
    from engine import events
    from engine.train import Trainer

    values = tiny_config(tmp_path, **{"trainer.max_steps": 400, "sampling.interval_steps": 0})
    event_queue = queue.Queue()
    trainer = Trainer(cfg.from_dict(values), event_queue)
    trainer.start()
    seen_steps = []
    while len(seen_steps) < 3:
        event = event_queue.get(timeout=120)
        assert not isinstance(event, events.Failed), event
        if isinstance(event, events.Step):
            seen_steps.append(event.step)
    requested_at = seen_steps[-1]
    trainer.stop(save_checkpoint=True)
    trainer.join(timeout=120)
    assert not trainer.thread.is_alive()
    result = trainer.result
    assert isinstance(result, events.Finished) and result.stopped
    assert result.step <= requested_at + 1
    run_dir = only_run(tmp_path)
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert newest.name == f"step-{result.step:08d}"

    resumed = run_cli("train", "--resume", str(run_dir), "--set", f"trainer.max_steps={result.step + 3}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, result.step + 4))


@pytest.mark.parametrize("override, expected", [
    ("no_such_key=1", "unknown config key 'no_such_key'"),
    ("batch_size=two", "config key 'batch_size': expected an integer, got 'two'"),
    ("model=/nonexistent/model", "config key 'model': not found: /nonexistent/model"),
    ("optimizer.params.lr=-1", "config key 'optimizer.params.lr': must be positive"),
    ("trainer.precision=8", "config key 'trainer.precision': expected one of"),
])
def test_config_mistakes_exit_with_one_line(tmp_path, override, expected):
    result = run_cli("train", "--config", "presets/tiny-demo-cpu.yaml", "--set", f"output_dir={tmp_path}",
                     "--set", override)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_json_events_stream_one_object_per_line(tmp_path, class_images):
    result = run_cli("train", "--config", "presets/tiny-demo-cpu.yaml", "--set", f"output_dir={tmp_path}",
                     "--set", "trainer.max_steps=3", "--set", "sampling.interval_steps=3", "--json-events")
    assert result.returncode == 0, result.stderr[-2000:]
    stream = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kinds = [e["kind"] for e in stream]
    assert kinds[-1] == "finished" and kinds.index("started") < kinds.index("step")
    assert [e["step"] for e in stream if e["kind"] == "step"] == [1, 2, 3]
    assert any(e["kind"] == "sample" and e["paths"] for e in stream)


def test_gpu_accelerator_without_cuda_falls_back_to_the_cpu_with_a_warning(monkeypatch):
    from engine.train import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = cfg.from_dict(tiny_config("/tmp", **{"trainer.accelerator": "gpu"}))
    with pytest.warns(UserWarning, match="no CUDA device is available: training on the CPU"):
        assert select_device(config).type == "cpu"


def test_wandb_offline_and_tensorboard_receive_the_metrics(tmp_path, class_images):
    values = tiny_config(tmp_path, **{"trainer.max_steps": 3, "sampling.interval_steps": 3,
                                      "loggers.wandb": {"sample": True}, "loggers.tensorboard": {}})
    config_file = tmp_path / "loggers.yaml"
    config_file.write_text(yaml.safe_dump(values))
    result = run_cli("train", "--config", str(config_file), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path)
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    event_files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_files[0].parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]


def test_a_resume_that_changes_the_batch_layout_warns(tmp_path, class_images):
    from engine import events
    from engine.train import Trainer

    values = tiny_config(tmp_path, **{"trainer.max_steps": 2, "sampling.interval_steps": 0,
                                      "data.concepts[0].class_set.auto_generate.enabled": False})
    first = Trainer(cfg.from_dict(values))
    assert isinstance(first.run(), events.Finished)

    def warnings_of_resume(*overrides):
        seen = []
        trainer = Trainer.for_resume(str(first.run_dir), overrides=list(overrides), on_event=seen.append)
        assert isinstance(trainer.run(), events.Finished)
        return [e.message for e in seen if isinstance(e, events.Log) and e.level == "warning"]

    assert not any("data position" in w for w in warnings_of_resume("trainer.max_steps=3"))
    moved = [w for w in warnings_of_resume("trainer.max_steps=4", "batch_size=1") if "data position" in w]
    assert moved == ["--set batch_size changes what the saved data position counts (2 -> 1): the resumed run "
                     "will not see exactly the images it would have seen"]


def test_metrics_log_the_learning_rate_each_step_used(tmp_path, class_images):
    from engine import events
    from engine.optim import build_optimizer, build_scheduler, scaled_lr
    from engine.train import Trainer

    values = tiny_config(tmp_path, **{"trainer.max_steps": 3, "sampling.interval_steps": 0,
                                      "optimizer.lr_scheduler.warmup": {"enabled": True, "steps": 2, "init_lr": 0.0},
                                      "data.concepts[0].class_set.auto_generate.enabled": False})
    config = cfg.from_dict(values)
    trainer = Trainer(config)
    assert isinstance(trainer.run(), events.Finished)
    # The schedule on its own: the rate in force before each step.
    optimizer = build_optimizer(config.optimizer, torch.nn.Linear(1, 1).parameters(),
                                scaled_lr(config.optimizer, config.batch_size))
    schedule = build_scheduler(config.optimizer, optimizer, total_steps=3)
    expected = []
    for _ in range(3):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert expected[0] == 0.0 and expected[2] > expected[1] > 0
    assert [m["lr"] for m in read_metrics(only_run(tmp_path))] == pytest.approx(expected)


def test_a_run_whose_event_reader_is_gone_stops_with_a_checkpoint_and_frees_its_folder(tmp_path, class_images):
    """The app reads a child run's events; when the app is killed the run must not train on unseen, holding its
    folder against the restarted app's resume."""
    import subprocess
    import sys

    from conftest import ROOT
    from engine.run_dir import RunLock

    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "train", "--config", "presets/tiny-demo-cpu.yaml", "--set",
         f"output_dir={tmp_path}", "--set", "trainer.max_steps=1000", "--set", "sampling.interval_steps=0",
         "--set", "checkpoint.every_n_train_steps=1000", "--json-events"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in process.stdout:
        if line.startswith("{") and json.loads(line)["kind"] == "step":
            seen = json.loads(line)["step"]
            break
    process.stdout.close()  # the reader goes: the run's next event meets a closed pipe
    assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    run_dir = only_run(tmp_path)
    saved = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    assert seen >= 1 and len(saved) == 1 and seen < saved[0] < 1000
    RunLock.acquire(run_dir).release()
