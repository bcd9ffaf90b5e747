"""trainer.strategy fsdp: two gloo processes that shard the denoiser train like one process, write the
checkpoints one process writes (which one process resumes), refuse at start what they cannot shard, and the
estimate's per-process figures."""
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli, run_torchrun, train_here
from engine import checkpoints
from engine import config as cfg
from engine import vram
from engine.plan import make_plan
from engine.testing import tiny_config

STEPS = {"trainer.max_steps": 4, "checkpoint.every_n_train_steps": 2, "checkpoint.save_top_k": -1,
         "sampling.interval_steps": 4, "sampling.concepts[0].num_samples": 1, "validation.every_n_steps": 2,
         "validation.split": 0.2, "validation.timesteps": [500], "gradient_checkpointing": True,
         # Adam divides by the root of its second moment: at eps 1e-8 a weight whose gradient is near 0 moves by
         # up to lr on rounding alone. At 1e-4 the comparison sees the sharded exchange, not that noise.
         "optimizer.params.eps": 1e-4}
TOLERANCE = 1e-5


def only_run(output_dir):
    (run_dir,) = (output_dir / "tiny-demo").iterdir()
    return run_dir


def unet_at(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "unet" / "diffusion_pytorch_model.safetensors")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def worst(expected, actual):
    assert expected.keys() == actual.keys()
    return max((expected[k] - actual[k]).abs().max().item() for k in expected)


@pytest.mark.parametrize("model", ["demo:tiny-sd", "demo:tiny-flux"], ids=["sd", "flux"])
def test_two_fsdp_ranks_equal_one_process_and_one_process_resumes_their_checkpoint(model, tmp_path, class_images):
    # one process at batch 2 trains 6 steps straight; two sharding processes at batch 1 train 4, and one
    # process (ddp, batch 2) resumes their checkpoint for the last 2
    one = tiny_config(tmp_path / "one", batch_size=2, model=model, **{**STEPS, "trainer.max_steps": 6})
    two = tiny_config(tmp_path / "two", batch_size=1, model=model, **STEPS, **{"trainer.strategy": "fsdp"})
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    train_here(one)
    result = run_torchrun(2, "--config", str(tmp_path / "two.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    single, sharded = only_run(tmp_path / "one"), only_run(tmp_path / "two")

    for step in (2, 4):
        assert worst(unet_at(single, step), unet_at(sharded, step)) <= TOLERANCE
    expected, actual = metrics(single)[:4], metrics(sharded)
    assert [m["step"] for m in actual] == [1, 2, 3, 4]
    for key in ("loss", "val_loss"):  # validation ran on both processes of the sharded run at steps 2 and 4
        assert [round(m[key], 4) for m in expected if key in m] == [round(m[key], 4) for m in actual if key in m]
    assert [m["step"] for m in actual if "val_loss" in m] == [2, 4]
    # the main process kept the samples both rendered
    assert [p.parent.name for p in sharded.glob("samples/*/*.png")] == ["000004"]
    # the optimizer state in the layout one process saves: parameters numbered in order, the same states
    saved = {name: checkpoints.load_state(run / "checkpoints" / "step-00000004")["optimizer"]
             for name, run in (("single", single), ("sharded", sharded))}
    sharded_state, single_state = saved["sharded"], saved["single"]
    assert [g["params"] for g in sharded_state["param_groups"]] == [g["params"] for g in single_state["param_groups"]]
    assert sharded_state["state"].keys() == single_state["state"].keys()
    assert all(torch.allclose(sharded_state["state"][i]["exp_avg"], single_state["state"][i]["exp_avg"], atol=1e-6)
               for i in single_state["state"])

    # each process holds half of the denoiser's weights (the first a row more where one is left over), as the
    # estimate's arithmetic says
    held = re.findall(r"fsdp: this process holds ([0-9.]+) MiB", result.stderr)
    assert held, result.stderr[-2000:]
    from engine.models.family import family_for

    components = family_for(cfg.from_dict(one)).load(cfg.from_dict(one))
    whole = sum(p.numel() * p.element_size() for p in components.unet.parameters())
    per_process = vram.sharded_weight_bytes(components.unet, 2)
    assert whole / 2 <= per_process < 0.6 * whole
    assert float(held[0]) == pytest.approx(per_process / 2**20, abs=1e-3)

    if model != "demo:tiny-flux":
        return  # the resume in one process is the same for both families: Flux.1's, the model fsdp is for
    resumed = run_cli("train", "--resume", str(sharded), "--set", "trainer.max_steps=6", "--set",
                      "trainer.strategy=ddp", "--set", "batch_size=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert worst(unet_at(single, 6), unet_at(sharded, 6)) <= TOLERANCE


def fsdp_config(tmp_path, **overrides):
    return cfg.from_dict(tiny_config(tmp_path, **{"trainer.strategy": "fsdp", "trainer.devices": 2, **overrides}))


@pytest.mark.parametrize("overrides,key", [
    ({"network.type": "lora"}, "network.type"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"ema.enabled": True}, "ema.enabled"),
    ({"weights_dtype": "bf16"}, "weights_dtype"),
    ({"optimizer.name": "adamw8bit"}, "optimizer.name"),
    ({"optimizer.name": "adafactor"}, "optimizer.name"),
    ({"optimizer.fused_backward": True}, "optimizer.fused_backward"),
    ({"memory.blocks_on_cpu": 1, "network.type": "lora"}, "memory.blocks_on_cpu"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_what_fsdp_cannot_shard_is_refused_naming_its_key(overrides, key, tmp_path):
    make_plan(fsdp_config(tmp_path), "cpu", 2)  # a full fine-tune with AdamW shards
    with pytest.raises(cfg.ConfigError, match=rf"^config key '{re.escape(key)}': "):
        make_plan(fsdp_config(tmp_path, **overrides), "cpu", 2)


def test_fsdp_in_one_process_is_refused_at_start_in_one_line(tmp_path):
    values = tiny_config(tmp_path / "out", **{"trainer.strategy": "fsdp", "trainer.max_steps": 2})
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(values))
    result = run_cli("train", "--config", str(tmp_path / "fsdp.yaml"))
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if "trainer.strategy" in line]
    assert len(refusals) == 1, result.stderr[-2000:]
    assert refusals[0].startswith("error: config key 'trainer.strategy': fsdp shards over several training "
                                  "processes (1 was started)")
    assert not (tmp_path / "out").exists()


def test_the_estimate_gives_each_fsdp_process_its_share_of_the_denoiser(tmp_path):
    from engine.models.family import family_for

    options = {"gradient_checkpointing": True}
    one = vram.estimate(cfg.from_dict(tiny_config(tmp_path, **options)))
    config = fsdp_config(tmp_path, **options)
    two = vram.estimate(config)
    assert two.peak < one.peak
    assert two.gradients < one.gradients and two.parameters > one.parameters / 2
    # AdamW's two states of each shard the first process holds: what its optimizer allocates (beside a 4-byte step
    # count per parameter)
    unet = family_for(config).load(config).unet
    assert two.optimizer_state * vram.GIB == pytest.approx(2 * vram.sharded_weight_bytes(unet, 2), rel=1e-3)
    assert one.optimizer_state * vram.GIB == pytest.approx(2 * sum(p.nbytes for p in unet.parameters()), rel=1e-3)
    assert "fsdp over 2 processes" in vram.describe(config, vram.estimate_plan(config), vram.step_shape(config))
