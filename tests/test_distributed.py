"""torchrun with two CPU processes (gloo) trains exactly like one process with the same global batch."""
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, run_cli
from engine import checkpoints
from engine.testing import tiny_config


def newest_unet(output_dir):
    (run_dir,) = (output_dir / "tiny-demo").iterdir()
    newest = checkpoints.latest_checkpoint(run_dir)
    return load_file(newest / "unet" / "diffusion_pytorch_model.safetensors"), newest


@pytest.mark.parametrize("model", [
    # each rank writes the caches during the first epoch (5 steps); after it every rank reads all of them
    {"model": "demo:tiny-sd", "trainer.max_steps": 6, "sampling.interval_steps": 3,
     "checkpoint.every_n_train_steps": 3, "cache.latents": True, "cache.text_embeddings": True,
     "cache.fill": "first_epoch"},
    # both SDXL text encoders train too: DDP averages the gradients of the pair as one module
    {"model": "demo:tiny-sdxl", "train_text_encoder": True},
], ids=["sd", "sdxl"])
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(model, tmp_path, class_images):
    steps = {"trainer.max_steps": 4, "sampling.interval_steps": 2, "checkpoint.every_n_train_steps": 2,
             "gradient_checkpointing": True, **model}
    last = f"step-{steps['trainer.max_steps']:08d}"
    single = tiny_config(tmp_path / "single", batch_size=2, **steps, **{"cache.dir": str(tmp_path / "c1")})
    ranks = tiny_config(tmp_path / "ddp", batch_size=1, **steps, **{"cache.dir": str(tmp_path / "c2")})
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(single))
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ranks))

    result = run_cli("train", "--config", str(tmp_path / "single.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "engine", "train", "--config", str(tmp_path / "ddp.yaml")]
    result = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    assert len(list((tmp_path / "ddp" / "tiny-demo").iterdir())) == 1
    expected, expected_ckpt = newest_unet(tmp_path / "single")
    actual, actual_ckpt = newest_unet(tmp_path / "ddp")
    assert expected_ckpt.name == actual_ckpt.name == last
    worst = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    assert worst <= 1e-5, worst
    if model.get("train_text_encoder"):
        for name in ("text_encoder", "text_encoder_2"):
            single_weights = load_file(expected_ckpt / name / "model.safetensors")
            ddp_weights = load_file(actual_ckpt / name / "model.safetensors")
            worst = max((single_weights[k] - ddp_weights[k]).abs().max().item() for k in single_weights)
            # the encoders' gradients sum over 77 token positions: float rounding differs a little more
            assert worst <= 5e-5, (name, worst)
    (run_dir,) = (tmp_path / "ddp" / "tiny-demo").iterdir()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == steps["trainer.max_steps"]
    assert len(list(run_dir.glob("samples/*"))) == 2
    if model.get("cache.fill"):
        from engine.data.cache import ShardStore

        # the two ranks together cached what the one process did: 20 crops and 3 prompts (the empty one too)
        for kind, count in (("latents", 20), ("text", 3)):
            (one,), (two,) = ((tmp_path / c).glob(f"{kind}-*") for c in ("c1", "c2"))
            assert set(ShardStore(one).keys()) == set(ShardStore(two).keys())  # ranks may write a key twice
            assert len(ShardStore(one)) == count


def test_fused_backward_is_refused_at_start_when_torchrun_starts_two_processes(tmp_path):
    values = tiny_config(tmp_path / "out", **{"optimizer.fused_backward": True, "trainer.max_steps": 2})
    (tmp_path / "fused.yaml").write_text(yaml.safe_dump(values))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "engine", "train", "--config", str(tmp_path / "fused.yaml")]
    result = subprocess.run(torchrun, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if "optimizer.fused_backward" in line]
    assert len(refusals) == 1, result.stderr[-3000:]
    assert refusals[0].startswith("error: config key 'optimizer.fused_backward': works in one training process "
                                  "only (2 were started)")
    assert not (tmp_path / "out").exists()  # refused before a run folder was made
