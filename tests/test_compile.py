"""compile: a run whose denoiser's repeated blocks and VAE encoder Inductor compiles trains as the eager run does,
compiles once for its one bucket, reports the compile time apart and keeps the kernels on disk; what it cannot combine with is
refused at start naming the key."""
import json

import pytest
from safetensors.torch import load_file

from engine import checkpoints, events, regional_compile
from engine import config as cfg
from engine.plan import make_plan
from engine.testing import tiny_config
from engine.train import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOLERANCE = 1e-5
COMPILE_BLOCKS = regional_compile.compile_blocks
COMPILE_ENCODER = regional_compile.compile_encoder


def _train(output_dir, monkeypatch, **overrides):
    """(per-step metrics, the adapter's tensors, the compiled modules) of a 3-step LoRA run at 64 px."""
    values = tiny_config(output_dir, **{
        "prior_preservation.enabled": False, "sampling.interval_steps": 0, "trainer.max_steps": 3,
        "checkpoint.every_n_train_steps": 3, "network.type": "lora", "network.rank": 4,
        # Adam's first steps move a weight by about lr whatever its gradient's size: at eps 1e-8 a gradient near 0
        # that rounds otherwise in the compiled kernels would move it the other way
        "optimizer.params.eps": 1e-4,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        **overrides})
    compiled = []
    monkeypatch.setattr(regional_compile, "compile_blocks", lambda unet: (
        COMPILE_BLOCKS(unet), compiled.extend(regional_compile.compiled_blocks(unet))))
    monkeypatch.setattr(regional_compile, "compile_encoder", lambda vae: (
        COMPILE_ENCODER(vae), compiled.extend(regional_compile.compiled_blocks(vae)))[0])
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    adapter = load_file(checkpoints.latest_checkpoint(trainer.run_dir) / "unet" / "adapter_model.safetensors")
    return metrics, adapter, compiled


@pytest.mark.parametrize("model, overrides, encoders", [
    # a batch of 1: SD1's blocks get a non-contiguous view of one image
    ("demo:tiny-sd", {"batch_size": 1}, 1),
    # with the features that wrap the blocks' forward and backward: checkpointing, its inputs offloaded, the
    # optimizer stepping each parameter from its gradient hook; latents cached, so the step runs no encoder
    ("demo:tiny-flux", {"gradient_checkpointing": True, "memory.offload_activations": True,
                        "optimizer.fused_backward": True, "cache.latents": True}, 0),
], ids=["sd", "flux"])
def test_compiled_blocks_train_as_the_eager_ones_and_compile_once(model, overrides, encoders, tmp_path, monkeypatch,
                                                                  sample_data, demo_cache):
    eager, eager_adapter, none = _train(tmp_path / "eager", monkeypatch, model=model, **overrides)
    compiled, compiled_adapter, blocks = _train(tmp_path / "compiled", monkeypatch, model=model, compile=True,
                                                **overrides)
    assert not none
    # the repeated blocks, the adapter's layers inside them, the VAE's encoder where the step encodes, and
    # nothing else
    compiled_encoders = [block for block in blocks if type(block).__name__ == "Encoder"]
    blocks = [block for block in blocks if block not in compiled_encoders]
    assert len(compiled_encoders) == encoders
    unet_classes = {type(block).__name__ for block in blocks}
    assert blocks and unet_classes <= {"BasicTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert all(any("lora_A" in name for name, _ in block.named_parameters()) for block in blocks)
    assert [record["loss"] for record in compiled] == pytest.approx([record["loss"] for record in eager],
                                                                     rel=TOLERANCE)
    assert compiled_adapter.keys() == eager_adapter.keys()
    assert max((compiled_adapter[k] - eager_adapter[k]).abs().max().item() for k in eager_adapter) < TOLERANCE
    # the first step compiled, apart from its step time; the others ran what it compiled
    assert compiled[0]["compile_s"] > 0
    assert [record.get("compile_s") for record in compiled[1:]] == [None, None]
    assert all("compile_s" not in record for record in eager)
    # Inductor's graph cache, which a later run of the same config reads
    assert list((demo_cache / "inductor" / "fxgraph").rglob("*"))


def test_compile_is_refused_with_block_swap():
    values = tiny_config("/tmp", compile=True, **{"network.type": "lora", "memory.blocks_on_cpu": 1})
    with pytest.raises(cfg.ConfigError, match=r"^config key 'compile': .*'memory.blocks_on_cpu'"):
        cfg.from_dict(values)


def test_compile_is_refused_with_fsdp_alone():
    """DDP trains each process's compiled blocks (test_distributed); FSDP's sharded blocks are not found."""
    for strategy, processes in (("ddp", 1), ("ddp", 2)):
        config = cfg.from_dict(tiny_config("/tmp", compile=True, **{"trainer.strategy": strategy}))
        assert make_plan(config, "cpu", processes=processes).processes == processes
    config = cfg.from_dict(tiny_config("/tmp", compile=True, **{"trainer.strategy": "fsdp"}))
    with pytest.raises(cfg.ConfigError, match=r"^config key 'compile': fully_shard .* with 'trainer.strategy: fsdp'"):
        make_plan(config, "cpu", processes=2)


def test_compile_without_a_cpp_compiler_is_refused_at_start(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    result = Trainer(cfg.from_dict(tiny_config(tmp_path, compile=True))).run()
    assert isinstance(result, events.Failed) and result.user_error
    assert result.error.startswith("config key 'compile': compiling for the CPU needs a C++ compiler")
    assert not (tmp_path / "tiny-demo").exists()
