"""torchrun with two CPU processes (gloo) trains exactly like one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, run_torchrun, train_here
from engine import checkpoints
from engine.testing import tiny_config


def newest_unet(output_dir):
    (run_dir,) = (output_dir / "tiny-demo").iterdir()
    newest = checkpoints.latest_checkpoint(run_dir)
    adapter = newest / "unet" / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else newest / "unet" / "diffusion_pytorch_model.safetensors"), newest


@pytest.mark.parametrize("model", [
    # each rank writes the caches during the first epoch (5 steps); after it every rank reads all of them,
    # encoded by the frozen text encoder stored in fp8
    {"model": "demo:tiny-sd", "trainer.max_steps": 6, "sampling.interval_steps": 3,
     "checkpoint.every_n_train_steps": 3, "cache.latents": True, "cache.text_embeddings": True,
     "cache.fill": "first_epoch", "base_dtype": "fp8"},
    # both SDXL text encoders train too: DDP averages the gradients of the pair as one module
    {"model": "demo:tiny-sdxl", "train_text_encoder": True},
    # the rectified-flow objective with dev's guidance and BFL's resolution-dependent shift, T5 stored in fp8
    {"model": "demo:tiny-flux", "base_dtype": "fp8", "flow.weighting": "cosmap"},
    # Qwen-Image's masked prompts of several lengths, cached; its last block's text-only layers stay frozen,
    # so DDP waits for no gradient that never comes
    {"model": "demo:tiny-qwen-image", "cache.text_embeddings": True},
    # FLUX.2 [klein]: the latents normalised by the autoencoder's statistics, Qwen3's three layers as the text
    {"model": "demo:tiny-flux2-klein", "cache.text_embeddings": True},
    # Chroma: T5's attention mask reaches the transformer, the prompts padded to different lengths
    {"model": "demo:tiny-chroma", "base_dtype": "fp8"},
    # Z-Image: Qwen3's prompts of several lengths, and a LoRA whose file every rank's checkpoint shares
    {"model": "demo:tiny-z-image", "network.type": "lora", "network.rank": 4},
    # Qwen-Image-Edit: the pairs' control images read with the caption and denoised beside the target
    {"model": "demo:tiny-qwen-image-edit", "data.concepts[0].instance_set.path": "demo:sample-data/edit",
     "data.concepts[0].instance_set.prompt": "{TXT_PROMPT}", "data.concepts[0].class_set": None,
     "prior_preservation.enabled": False,
     "sampling.concepts[0].control_image": "demo:sample-data/edit/pair_00.control.png",
     "sampling.concepts[0].steps": 2, "sampling.concepts[0].cfg_scale": 1.0},
], ids=["sd", "sdxl", "flux", "qwen-image", "flux2-klein", "chroma", "z-image", "qwen-image-edit"])
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(model, tmp_path, class_images):
    steps = {"trainer.max_steps": 4, "sampling.interval_steps": 2, "checkpoint.every_n_train_steps": 2,
             "gradient_checkpointing": True, **model}
    last = f"step-{steps['trainer.max_steps']:08d}"
    single = tiny_config(tmp_path / "single", batch_size=2, **steps, **{"cache.dir": str(tmp_path / "c1")})
    ranks = tiny_config(tmp_path / "ddp", batch_size=1, **steps, **{"cache.dir": str(tmp_path / "c2")})
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ranks))

    train_here(single)
    result = run_torchrun(2, "--config", str(tmp_path / "ddp.yaml"))
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
    result = run_torchrun(2, "--config", str(tmp_path / "fused.yaml"))
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if "optimizer.fused_backward" in line]
    assert len(refusals) == 1, result.stderr[-3000:]
    assert refusals[0].startswith("error: config key 'optimizer.fused_backward': works in one training process "
                                  "only (2 were started)")
    assert not (tmp_path / "out").exists()  # refused before a run folder was made


def test_two_ranks_on_an_empty_cache_build_the_demo_model_whole_and_train_on_it(tmp_path):
    """Both ranks find the demo model missing and build it at once: whichever copy lands, its text encoder has
    its weights (a rank other than 0 inside a process group would write none) and both ranks load it."""
    values = tiny_config(tmp_path / "out", **{
        "prior_preservation.enabled": False, "trainer.max_steps": 1, "sampling.interval_steps": 0,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}]})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    result = run_torchrun(2, "--config", str(tmp_path / "run.yaml"), env={"SCAL_SDT_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(tmp_path / "cache" / "tiny-sd" / "text_encoder" / "model.safetensors")
    assert len(weights) > 10
    (run_dir,) = (tmp_path / "out" / "tiny-demo").iterdir()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


# -- every optimizer mode: two gloo ranks at batch 1 against one process at batch 2 ------------------------------
MODE_STEPS = 3
FP32_TOLERANCE = 1e-5
SCHEDULE_FREE_SIDE_TASKS = {"optimizer.name": "adamw_schedulefree", "checkpoint.every_n_train_steps": 2,
                            "sampling.interval_steps": 2, "sampling.concepts[0].num_samples": 1,
                            "validation.every_n_steps": 1, "validation.split": 0.2, "validation.timesteps": [500]}
LORA = {"network.type": "lora", "network.rank": 4, "network.alpha": 4, "optimizer.params.lr": 1e-2}
# mode: (overrides, the largest difference from one process allowed, or None for bf16 weights)
MODES = {
    "adamw": ({}, FP32_TOLERANCE),
    # stochastic rounding draws the same noise on every rank
    "bf16": ({"weights_dtype": "bf16"}, None),
    # The 8-bit state is quantized per block: a gradient that differs in its last bits can move a state value
    # to the neighbouring code, and the step by a few percent of lr (1e-3).
    "adamw8bit": ({"optimizer.name": "adamw8bit"}, 2.5e-4),
    "adafactor": ({"optimizer.name": "adafactor"}, FP32_TOLERANCE),
    # rank 0 alone validates, samples and saves, at the evaluation weights, in the middle of the run
    "schedulefree": (SCHEDULE_FREE_SIDE_TASKS, FP32_TOLERANCE),
    "schedulefree-bf16": ({**SCHEDULE_FREE_SIDE_TASKS, "weights_dtype": "bf16"}, None),
    # Prodigy's own step size starts at 1e-6 and grows over far more steps than these: lr multiplies it, so
    # that the weights travel as far as the others'.
    "prodigy": ({"optimizer.name": "prodigy", "optimizer.params.lr": 100.0}, FP32_TOLERANCE),
    "lora": (LORA, FP32_TOLERANCE),
    "accumulate": ({"trainer.accumulate_grad_batches": 3}, FP32_TOLERANCE),
    # each rank compiles its own blocks, which at batch 1 are handed a non-contiguous view of one image
    "lora-compile": ({**LORA, "compile": True}, FP32_TOLERANCE),
}


@pytest.fixture(scope="module")
def mode_runs(tmp_path_factory, sample_data, tiny_model):
    """Each mode trained by two gloo ranks at batch 1 and by one process at batch 2, every mode in one torchrun
    launch and one plain process (tests/ddp_probe.py): {mode: (rank 0, rank 1, one process)} as the probe
    records them, and the tiny model's untrained UNet."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("modes")
    files = {"ddp": [], "one": []}
    for kind, batch_size in (("ddp", 1), ("one", 2)):
        for mode, (overrides, _) in MODES.items():
            values = tiny_config(root / "runs" / kind / mode, batch_size=batch_size, **{
                "prior_preservation.enabled": False,
                "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
                "trainer.max_steps": MODE_STEPS, "sampling.interval_steps": 0,
                "checkpoint.every_n_train_steps": 1000, "optimizer.lr_scheduler.warmup.enabled": False,
                # Adam divides by the root of its second moment: at eps 1e-8 a weight whose gradient is near 0
                # moves by up to lr on rounding alone. At 1e-4 the comparison sees the exchange, not that noise.
                "optimizer.params.eps": 1e-4, **overrides})
            path = root / kind / f"{mode}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(values))
            files[kind].append(str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probe = str(ROOT / "tests" / "ddp_probe.py")
    launches = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        probe, str(root / "ddp"), *files["ddp"]],
                "one": [sys.executable, probe, str(root / "one"), *files["one"]]}
    for kind, command in launches.items():
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
    import torch

    def recorded(kind, mode, rank):
        return torch.load(root / kind / f"{mode}-rank{rank}.pt")

    runs = {mode: (recorded("ddp", mode, 0), recorded("ddp", mode, 1), recorded("one", mode, 0)) for mode in MODES}
    return runs, load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_rank_ends_its_process_group_after_its_ddp_wrappers(mode_runs):
    """A DDP wrapper still alive then would be the last to hold the group, whose end would wait for gloo's threads
    while holding the GIL they may need, and the rank could hang at the end of its run."""
    runs, _ = mode_runs
    for mode, (rank0, rank1, one) in runs.items():
        assert [len(rank0["forwards"]), len(rank1["forwards"])] == [1, 1], mode  # each rank wrapped its UNet
        assert [rank0["alive_at_end"], rank1["alive_at_end"], one["alive_at_end"]] == [0, 0, 0], mode


@pytest.mark.parametrize("mode", list(MODES))
def test_every_optimizer_mode_trains_alike_on_two_gloo_ranks_and_one_process(mode, mode_runs):
    import torch

    runs, untrained = mode_runs
    rank0, rank1, one = runs[mode]
    _, tolerance = MODES[mode]
    assert rank0["weights"].keys() == rank1["weights"].keys() == one["weights"].keys()
    # the ranks hold the very same weights
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    # one gradient exchange per optimizer step, after the step's last forward pass
    for record in (rank0, rank1):
        (exchanges,), (forwards,) = record["exchanges"], record["forwards"]
        assert len(exchanges) == MODE_STEPS and exchanges[-1] == forwards, (exchanges, forwards)
        if mode == "accumulate":
            assert forwards >= 2 * MODE_STEPS  # (an epoch's last group may hold fewer than 3)
        else:
            assert exchanges == list(range(1, MODE_STEPS + 1))
    assert one["exchanges"] == []
    difference = {k: (rank0["weights"][k].float() - one["weights"][k].float()).abs() for k in rank0["weights"]}
    full = [k for k in difference if k.startswith("unet.") and k[len("unet."):] in untrained]
    if full:  # the runs moved the weights, on average by many times the fp32 tolerance
        start = {k: untrained[k[len("unet."):]].to(one["weights"][k].dtype) for k in full}
        moved = torch.cat([(one["weights"][k] - start[k]).float().abs().flatten() for k in full])
        assert moved.mean() > 20 * FP32_TOLERANCE, moved.mean()
    if tolerance is not None:
        worst = max(d.max().item() for d in difference.values())
        assert worst <= tolerance, worst
    else:
        # bf16 compute rounds a batch of 2 and two of 1 differently, and stochastic rounding turns that into a
        # bf16 step for some weights (2**-7 of the weight); on average they differ far less than they moved
        mean = torch.cat([d.flatten() for d in difference.values()]).mean()
        assert mean < 0.05 * moved.mean(), (mean, moved.mean())
        assert rank0["weights"][full[0]].dtype == torch.bfloat16


def test_a_failed_run_has_let_go_of_its_models_when_it_ends_its_process_group(tmp_path, tiny_model, monkeypatch):
    """A fault in the step leaves frames that hold the models; they are cleared before the process group ends, so
    that, as on a run that finishes, DDP's reducer is not what ends the group."""
    import weakref

    import engine.train
    from engine import config as cfg
    from engine import events

    unets, alive = [], []

    def faulty_step(config, models, *args, **kwargs):
        unets.append(weakref.ref(models.unet))
        raise RuntimeError("a fault in the step")

    monkeypatch.setattr(engine.train, "compute_loss", faulty_step)
    monkeypatch.setattr(engine.train.distributed, "shutdown", lambda topology: alive.append(unets[0]() is not None))
    values = tiny_config(tmp_path / "out", **{
        "prior_preservation.enabled": False, "trainer.max_steps": 1, "sampling.interval_steps": 0,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}]})
    result = engine.train.Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Failed) and "RuntimeError: a fault in the step" in result.error
    assert 'in faulty_step\n    raise RuntimeError("a fault in the step")' in result.error  # the traceback is whole
    assert alive == [False]
