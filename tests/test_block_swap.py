"""Block swap and offloaded activations (`memory.*`) train exactly as without them, and really move what they
say: the swap's placement log, and the device of what autograd saves."""
import pytest
import torch

from engine import block_swap
from engine import config as cfg
from engine import paths
from engine.models.family import family_for
from engine.plan import make_plan
from engine.setup import build_optimizer, parameter_groups, prepare_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_flux(demo_cache):
    return paths.demo_model_dir("flux")


def _config(model, **values):
    values.setdefault("prior_preservation", {"enabled": False})
    return cfg.from_dict({"model": str(model), "seed": 0, **values})


def _inputs(family, components):
    """A fixed noisy latent, timesteps and conditioning for the denoiser."""
    generator = torch.Generator().manual_seed(0)
    unet = components.unet
    if hasattr(unet, "single_transformer_blocks"):
        latents = torch.randn(2, 16, 4, 4, generator=generator)
        width = unet.config.joint_attention_dim
        conditioning = {"encoder_hidden_states": torch.randn(2, 7, width, generator=generator),
                        "pooled_projections": torch.randn(2, unet.config.pooled_projection_dim, generator=generator)}
    else:
        latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
        conditioning = {"encoder_hidden_states": torch.randn(2, 7, unet.config.cross_attention_dim,
                                                             generator=generator)}
    return latents, torch.tensor([250.0, 875.0]), conditioning


def _prepared(model, **values):
    config = _config(model, **values)
    family = family_for(config)
    components = family.load(config)
    plan = make_plan(config, "cpu")
    prepare_models(family, components, config, plan, CPU)
    return config, family, components, plan


def _loss(family, components):
    latents, timesteps, conditioning = _inputs(family, components)
    return family.predict(components.unet, latents, timesteps, conditioning, None).square().mean()


def _adapter_run(model, **values):
    """Loss and the adapter's gradients of one forward and backward."""
    config, family, components, plan = _prepared(model, network={"type": "lora", "rank": 4}, **values)
    loss = _loss(family, components)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in components.unet.named_parameters() if p.requires_grad}
    return loss.detach(), grads, components.unet


def _check_log(swap, swapped: list[int], backward: bool = True):
    moments = {}
    for placement in swap.log:
        moments.setdefault(placement.block, []).append((placement.moment, placement.where))
        assert placement.resident <= 2  # the running block and the next one's copy
    assert sorted(moments) == swapped
    expected = [("before forward", "device"), ("after forward", "cpu")]
    if backward:
        expected += [("before backward", "device"), ("after backward", "cpu")]
    for index in swapped:
        assert moments[index] == expected, index


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_flux_adapter_with_blocks_on_the_cpu_gives_the_same_loss_and_gradients(tiny_flux, checkpointing):
    loss, grads, _ = _adapter_run(tiny_flux, gradient_checkpointing=checkpointing)
    swapped_loss, swapped_grads, unet = _adapter_run(tiny_flux, gradient_checkpointing=checkpointing,
                                                     memory={"blocks_on_cpu": 2})
    assert torch.equal(loss, swapped_loss)
    assert grads.keys() == swapped_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], swapped_grads[name]), name
    total = len(block_swap.repeated_blocks(unet))
    _check_log(unet.block_swap, list(range(total - 2, total)))
    # the swapped blocks' frozen weights wait in their CPU copies; the adapter's stay with the model
    assert not unet.block_swap.ready
    assert all(entries and not any(entry.trained for entry in entries) for entries in unet.block_swap.tensors.values())


def test_sd_unet_blocks_swap_too(tiny_model):
    loss, grads, _ = _adapter_run(tiny_model)
    swapped_loss, swapped_grads, unet = _adapter_run(tiny_model, memory={"blocks_on_cpu": 3})
    assert torch.equal(loss, swapped_loss)
    for name in grads:
        assert torch.equal(grads[name], swapped_grads[name]), name
    blocks = block_swap.repeated_blocks(unet)
    assert blocks[0] is unet.down_blocks[0] and blocks[-1] is unet.up_blocks[-1]
    _check_log(unet.block_swap, list(range(len(blocks) - 3, len(blocks))))


def _full_step(model, **values):
    """A full fine-tune's fused step: the transformer's weights after it, and the loss they then give."""
    config, family, components, plan = _prepared(
        model, network={"type": "full"}, optimizer={"fused_backward": True, "name": "sgd", "params": {"lr": 0.1}},
        **values)
    groups = parameter_groups(components, plan, config, config.optimizer.params.lr)
    optimizer = build_optimizer(config, plan, groups)
    optimizer.armed = True
    _loss(family, components).backward()
    weights = {name: p.detach().clone() for name, p in components.unet.named_parameters()}
    with torch.no_grad():
        after = _loss(family, components)
    return weights, after, components.unet


def test_a_full_fine_tune_with_fused_backward_steps_the_swapped_blocks_as_the_resident_ones(tiny_flux):
    weights, after, _ = _full_step(tiny_flux)
    swapped_weights, swapped_after, unet = _full_step(tiny_flux, memory={"blocks_on_cpu": 2})
    assert torch.equal(after, swapped_after)
    moved = 0
    for name, value in weights.items():
        assert torch.equal(value, swapped_weights[name]), name
    for entries in unet.block_swap.tensors.values():
        moved += sum(entry.trained for entry in entries)
    assert moved > 0  # the trained weights themselves travelled, and came back stepped
    # the no-grad forward after the step loaded and unloaded each block, with no backward
    _check_log(unet.block_swap, [len(block_swap.repeated_blocks(unet)) - 2, len(block_swap.repeated_blocks(unet)) - 1],
               backward=False)


def test_block_swap_refusals(tiny_flux):
    with pytest.raises(cfg.ConfigError, match=r"^config key 'memory.blocks_on_cpu': .*optimizer.fused_backward"):
        _config(tiny_flux, network={"type": "full"}, memory={"blocks_on_cpu": 2})
    with pytest.raises(cfg.ConfigError, match=r"^config key 'memory.blocks_on_cpu': this model has 2 blocks"):
        _prepared(tiny_flux, network={"type": "lora"}, memory={"blocks_on_cpu": 3})
    with pytest.raises(cfg.ConfigError, match=r"^config key 'memory.blocks_on_cpu': works in one training process"):
        make_plan(_config(tiny_flux, network={"type": "lora"}, memory={"blocks_on_cpu": 1}), "cuda", processes=2)
    with pytest.raises(cfg.ConfigError, match=r"^config key 'memory.blocks_on_cpu'"):
        _config(tiny_flux, memory={"blocks_on_cpu": -1})


class RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """save_on_cpu that records the device of what it packs each tensor into, the tensor's size and storage."""
    packed: list = []
    sizes: list = []
    storages: dict = {}

    def __init__(self, pin_memory=False, device_type="cuda"):
        super().__init__(pin_memory, device_type)
        pack = self.pack_hook

        def recording_pack(tensor):
            result = pack(tensor)
            RecordingSaveOnCpu.packed.append(result[1].device)
            RecordingSaveOnCpu.sizes.append(tensor.numel() * tensor.element_size())
            RecordingSaveOnCpu.storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return result
        self.pack_hook = recording_pack


def test_offloaded_activations_keep_the_blocks_inputs_on_the_cpu_and_change_nothing(tiny_flux, monkeypatch):
    loss, grads, _ = _adapter_run(tiny_flux, gradient_checkpointing=True)
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    RecordingSaveOnCpu.packed, RecordingSaveOnCpu.sizes, RecordingSaveOnCpu.storages = [], [], {}
    offloaded_loss, offloaded_grads, unet = _adapter_run(tiny_flux, gradient_checkpointing=True,
                                                         memory={"offload_activations": True})
    assert torch.equal(loss, offloaded_loss)
    for name in grads:
        assert torch.equal(grads[name], offloaded_grads[name]), name
    # each checkpointed block saved its tensor inputs (image and text hidden states, the embedding) to the CPU
    blocks = len(block_swap.repeated_blocks(unet))
    assert len(RecordingSaveOnCpu.packed) >= 3 * blocks
    assert set(RecordingSaveOnCpu.packed) == {CPU}


def test_offloaded_activations_need_gradient_checkpointing(tiny_flux):
    with pytest.raises(cfg.ConfigError, match=r"^config key 'memory.offload_activations': .*gradient_checkpointing"):
        _config(tiny_flux, memory={"offload_activations": True})


def _train_flux(output_dir, **overrides):
    from safetensors.torch import load_file

    from engine import checkpoints, events
    from engine.testing import tiny_config
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": "demo:tiny-flux", "prior_preservation.enabled": False, "gradient_checkpointing": True,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "network.type": "lora", "network.rank": 4, "trainer.max_steps": 2, "checkpoint.every_n_train_steps": 2,
        **overrides})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    checkpoint = checkpoints.latest_checkpoint(trainer.run_dir)
    return trainer.run_dir, load_file(checkpoint / "unet" / "adapter_model.safetensors")


def test_a_training_run_with_both_features_saves_the_same_adapter_and_samples(tmp_path, sample_data, monkeypatch):
    _, plain = _train_flux(tmp_path / "plain", **{"sampling.interval_steps": 0})
    swaps = []
    apply = block_swap.apply
    monkeypatch.setattr(block_swap, "apply", lambda *args, **kwargs: swaps.append(apply(*args, **kwargs)) or swaps[-1])
    run_dir, swapped = _train_flux(tmp_path / "swapped", **{"memory.blocks_on_cpu": 2,
                                                            "memory.offload_activations": True})
    assert plain.keys() == swapped.keys()
    for key in plain:
        assert torch.equal(plain[key], swapped[key]), key
    assert list((run_dir / "samples").rglob("*.png"))
    # the last forward was a sample's, through the swapped blocks
    (swap,) = swaps
    _check_log(swap, [0, 1], backward=False)


GIB = 2**30


def _tiny_sd(tmp_path, **overrides):
    from engine.testing import tiny_config

    return cfg.load(base=tiny_config(tmp_path, **{"network.type": "lora", "network.rank": 4,
                                                   "gradient_checkpointing": True, "trainer.accelerator": "gpu",
                                                   **overrides}))


@pytest.fixture(scope="module")
def plain_estimate(tiny_model, tmp_path_factory):
    """The estimate of a tiny SD LoRA run with gradient checkpointing on the GPU, without the memory features."""
    from engine import vram

    return vram.estimate(_tiny_sd(tmp_path_factory.mktemp("plain")))


def test_the_estimates_count_the_swapped_blocks_off_the_device_and_in_system_memory(tiny_model, tmp_path,
                                                                                   plain_estimate):
    from engine import vram
    from engine.models.sd import load_components

    plain = plain_estimate
    swapped = vram.estimate(_tiny_sd(tmp_path, **{"memory.blocks_on_cpu": 4}))
    # every down and up block's frozen weights wait in system memory; the two largest are on the device at once
    sizes = sorted((sum(p.numel() * 4 for p in block.parameters())
                    for block in block_swap.repeated_blocks(load_components(str(tiny_model)).unet)), reverse=True)
    assert (plain.peak - swapped.peak) * GIB == pytest.approx(sum(sizes[2:]), rel=0.02)
    assert (plain.parameters - swapped.parameters) * GIB == pytest.approx(sum(sizes[2:]), rel=0.02)
    assert (swapped.ram.training - plain.ram.training) * GIB == pytest.approx(sum(sizes), rel=0.02)
    # a trace kept for another count of swapped blocks gives the same estimate, and refuses more than there are
    traces = {}
    vram.estimate(_tiny_sd(tmp_path, **{"memory.blocks_on_cpu": 3}), traces=traces)
    assert vram.estimate(_tiny_sd(tmp_path, **{"memory.blocks_on_cpu": 4}), traces=traces) == swapped
    assert len(traces) == 1
    with pytest.raises(cfg.ConfigError, match=r"^config key 'memory.blocks_on_cpu': this model has 4 blocks"):
        vram.estimate(_tiny_sd(tmp_path, **{"memory.blocks_on_cpu": 5}), traces=traces)


def test_the_estimates_count_the_offloaded_activations(tiny_model, tmp_path, monkeypatch, plain_estimate):
    from engine import vram

    plain = plain_estimate
    config = _tiny_sd(tmp_path, **{"memory.offload_activations": True})
    offloaded = vram.estimate(config)
    # what a real step of the estimated shape packs
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    RecordingSaveOnCpu.packed, RecordingSaveOnCpu.sizes, RecordingSaveOnCpu.storages = [], [], {}
    _, family, components, _ = _prepared(tiny_model, gradient_checkpointing=True, network={"type": "lora"},
                                         memory={"offload_activations": True})
    shape = vram.step_shape(config)
    latents = torch.randn(shape.rows, 4, shape.height // 8, shape.width // 8)
    conditioning = {"encoder_hidden_states": torch.randn(shape.rows, 77, components.unet.config.cross_attention_dim)}
    family.predict(components.unet, latents, torch.tensor([500.0] * shape.rows), conditioning, None)
    packed = sum(RecordingSaveOnCpu.sizes)
    # system memory holds a copy of each packed tensor; the device is spared at most each stored tensor once
    # (blocks share some inputs), less those the peak keeps anyway
    assert (offloaded.ram.training - plain.ram.training) * GIB == pytest.approx(packed, rel=0.02)
    unique = sum(RecordingSaveOnCpu.storages.values())
    assert 0.5 * unique < (plain.peak - offloaded.peak) * GIB <= unique < packed


def test_a_resumed_optimizer_state_is_loaded_while_the_swapped_weights_are_seen_on_the_device():
    """Loading an optimizer state puts it on its parameter's device: a swapped block's trained weights, on
    the CPU between steps, are seen on the device (empty) meanwhile, then given back their values."""
    block = torch.nn.Linear(4, 4)
    stepped = torch.optim.AdamW(block.parameters())
    block(torch.ones(1, 4)).sum().backward()
    stepped.step()
    weights = [p.detach().clone() for p in block.parameters()]
    swap = block_swap.BlockSwap({0: block}, CPU, stays_trained=False)
    optimizer = torch.optim.AdamW(block.parameters())
    with swap.trained_seen_on_device():
        seen = [(p.device, p.numel()) for p in block.parameters()]
        optimizer.load_state_dict(stepped.state_dict())
    assert seen == [(CPU, 0), (CPU, 0)]
    assert all(torch.equal(p, w) for p, w in zip(block.parameters(), weights))
    for param in block.parameters():
        assert torch.equal(optimizer.state[param]["exp_avg"], stepped.state[param]["exp_avg"])


def test_the_gpu_bench_times_a_swaps_copies_and_their_overlap(tiny_flux, capsys):
    """bench/gpu.py's block-swap figures, on the CPU (where the swap copies all the same): the copies of a
    step timed alone leave every block in system memory, and the share of them hidden behind compute."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    _, _, components, _ = _prepared(
        tiny_flux, network={"type": "full"}, memory={"blocks_on_cpu": 2},
        optimizer={"fused_backward": True, "name": "sgd", "params": {"lr": 0.1}})
    swap = components.unet.block_swap
    assert gpu.copy_seconds(swap, rounds=1) > 0
    assert not swap.ready and all(entry.tensor.data_ptr() == entry.cpu.data_ptr()
                                  for entries in swap.tensors.values() for entry in entries)
    assert gpu.overlap(0.10, 0.13, 0.05) == pytest.approx({"added_s": 0.03, "copies_s": 0.05, "hidden": 0.4})
    assert gpu.overlap(0.10, 0.10, 0.05)["hidden"] == 1.0 and gpu.overlap(0.10, 0.20, 0.05)["hidden"] == 0.0
    assert gpu.main([]) == 0 and capsys.readouterr().out == "no CUDA device\n"
