"""Memory-saving switches give the same training result where they must, and really change how the step
runs: each equality test also watches the trainer's UNet through PyTorch hooks, which would tell a
switch that was ignored from one that works."""
import functools
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoints, events
from engine import config as cfg
from engine.optim import PerParameterOptimizer, stochastic_round_to_bf16
from engine.testing import tiny_config
from engine.train import Trainer

# The UNet's parameters after its down path (up blocks and output layers): their gradients are complete
# by the time backward reaches the output of conv_in, the UNet's first layer.
WATCHED_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


@dataclass
class MicroBatch:
    """One training forward and backward of the UNet, as the hooks saw it."""
    dtypes: set                        # of the UNet's parameters during the forward
    saved_bytes: int = 0               # activations autograd kept for backward (parameters not counted)
    resnet_calls: int = 0              # forward calls of the down and up blocks' resnets, recomputation included
    # Late in backward, when the gradient reaches conv_in's output:
    with_grad: int = -1                # watched parameters holding a gradient
    moved: int = -1                    # watched parameters changed since the forward began
    grad_bytes: int = -1               # all UNet gradients alive


@dataclass
class Watch:
    watched: int = 0
    batches: list = field(default_factory=list)


class UNetWatcher:
    """Finds the trainer's UNet when it first runs in training mode and hooks into it."""

    def __init__(self):
        self.watch = Watch()
        self.unet = None
        self.handles = []

    def _discover(self, module, args):
        from diffusers import UNet2DConditionModel

        if self.unet is None and isinstance(module, UNet2DConditionModel) and module.training:
            self._attach(module)

    def _attach(self, unet):
        from diffusers.models.resnet import ResnetBlock2D

        self.unet = unet
        watched = [p for n, p in unet.named_parameters() if n.startswith(WATCHED_PREFIXES)]
        self.watch.watched = len(watched)
        snapshot = {}

        def begin(module, args):
            snapshot["weights"] = [p.detach().clone() for p in watched]
            self.watch.batches.append(MicroBatch(dtypes={p.dtype for p in unet.parameters()}))

        def late_in_backward(grad):
            batch = self.watch.batches[-1]
            batch.with_grad = sum(p.grad is not None for p in watched)
            batch.moved = sum(not torch.equal(p, before) for p, before in zip(watched, snapshot["weights"]))
            batch.grad_bytes = sum(p.grad.nbytes for p in unet.parameters() if p.grad is not None)

        def on_conv_in(module, args, output):
            if output.requires_grad:
                output.register_hook(late_in_backward)

        def count_call(module, args):
            if self.watch.batches:
                self.watch.batches[-1].resnet_calls += 1

        # Registered while the UNet's first training forward is starting, so it already counts.
        self.handles.append(unet.register_forward_pre_hook(begin))
        begin(unet, ())
        self.handles.append(unet.conv_in.register_forward_hook(on_conv_in))
        for name, module in unet.named_modules():
            # A pre-hook: a recomputation in backward stops once it has what it needs, before any
            # forward hook would run.
            if isinstance(module, ResnetBlock2D) and name.startswith(("down_blocks.", "up_blocks.")):
                self.handles.append(module.register_forward_pre_hook(count_call))

    def _pack(self, tensor):
        if self.watch.batches and not isinstance(tensor, torch.nn.Parameter):
            self.watch.batches[-1].saved_bytes += tensor.nbytes
        return tensor

    def __enter__(self) -> Watch:
        self.handles.append(torch.nn.modules.module.register_module_forward_pre_hook(self._discover))
        # The outermost saved-tensor hooks: checkpointed regions keep their tensors under their own
        # hooks, so only what a step really keeps for backward arrives here.
        self.saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.saved.__enter__()
        return self.watch

    def __exit__(self, *exc):
        self.saved.__exit__(*exc)
        for handle in self.handles:
            handle.remove()


def train_and_read_unet(output_dir, **overrides):
    values = tiny_config(output_dir, **{"trainer.max_steps": 4, "sampling.interval_steps": 0,
                                        "checkpoint.every_n_train_steps": 4, **overrides})
    with UNetWatcher() as watch:
        result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished), result
    (run_dir,) = (output_dir / "tiny-demo").iterdir()
    newest = checkpoints.latest_checkpoint(run_dir)
    return load_file(newest / "unet" / "diffusion_pytorch_model.safetensors"), watch


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory, class_images):
    """The plain run for each accumulation, trained once for the tests that compare against it."""
    return functools.cache(lambda accumulation: train_and_read_unet(
        tmp_path_factory.mktemp(f"normal-{accumulation}"), **{"trainer.accumulate_grad_batches": accumulation}))


def largest_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# Per-parameter AdamW does the same arithmetic as one AdamW over all parameters; only the order of
# floating-point operations may differ.
TOLERANCE = 1e-6


def last_of_group(accumulation: int, batches_per_epoch: int, steps: int) -> list[bool]:
    """For each micro-batch of a run, whether it completes its accumulation group (and so steps).
    Groups are counted from each epoch's start; an epoch's last group may be shorter."""
    flags: list[bool] = []
    while flags.count(True) < steps:
        for start in range(0, batches_per_epoch, accumulation):
            flags += [False] * (min(accumulation, batches_per_epoch - start) - 1) + [True]
            if flags.count(True) == steps:
                break
    return flags


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fused_backward_matches_the_normal_optimizer_step(tmp_path, normal_run, sample_data, accumulation):
    normal, normal_watch = normal_run(accumulation)
    fused, fused_watch = train_and_read_unet(tmp_path, **{"optimizer.fused_backward": True,
                                                          "trainer.accumulate_grad_batches": accumulation})
    assert largest_difference(normal, fused) <= TOLERANCE
    watched = fused_watch.watched
    images = len(list((sample_data / "instance").glob("*.png")))  # one bucket, batches of 2
    stepping = last_of_group(accumulation, images // 2, steps=4)
    assert watched > 0 and len(normal_watch.batches) == len(fused_watch.batches) == len(stepping)
    # The normal step runs after backward: late in backward every gradient is there, no weight has moved.
    for batch in normal_watch.batches:
        assert (batch.with_grad, batch.moved) == (watched, 0)
    full_gradients = normal_watch.batches[-1].grad_bytes
    assert full_gradients > 0
    for index, (batch, steps_now) in enumerate(zip(fused_watch.batches, stepping)):
        if steps_now:
            # Fused: each parameter has already stepped inside this backward and dropped its gradient,
            # so the gradients alive at this point are a small part of the full set.
            assert batch.with_grad == 0, index
            assert batch.grad_bytes < 0.1 * full_gradients, index
            if stepping[:index].count(True) > 0:  # the warmup's learning rate is 0 on the first step
                assert batch.moved == watched, index
        else:
            # An earlier micro-batch of an accumulation group only accumulates.
            assert (batch.with_grad, batch.moved) == (watched, 0), index


def test_gradient_checkpointing_does_not_change_the_result(tmp_path, normal_run):
    plain, plain_watch = normal_run(1)
    checkpointed, checkpointed_watch = train_and_read_unet(tmp_path, gradient_checkpointing=True)
    assert largest_difference(plain, checkpointed) <= TOLERANCE
    assert len(plain_watch.batches) == len(checkpointed_watch.batches) == 4
    for without, with_ in zip(plain_watch.batches, checkpointed_watch.batches):
        # Each checkpointed resnet runs a second time, in backward, to recompute its activations...
        assert without.resnet_calls > 0 and with_.resnet_calls == 2 * without.resnet_calls
        # ...which the forward therefore did not keep.
        assert with_.saved_bytes < 0.5 * without.saved_bytes


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not():
    value = torch.full((200_000,), 1.0 + 2 ** -10)  # between two bf16 neighbours (1 and 1 + 2**-7)
    nearest = value.to(torch.bfloat16).float()
    rounded = stochastic_round_to_bf16(value, torch.Generator().manual_seed(0)).float()
    assert nearest.unique().tolist() == [1.0]
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2 ** -10, abs=2e-5)


def test_a_bf16_step_smaller_than_half_a_bf16_step_survives_on_average():
    # AdamW's first step moves every weight by lr against the sign of its gradient. Below 1.0 the bf16
    # neighbours are 2**-8 apart, so an update of 2**-10 rounds to nothing with round-to-nearest; with
    # stochastic rounding a quarter of the weights drop one neighbour and the mean follows the update.
    options = cfg.from_dict(tiny_config("/tmp")).optimizer
    weight = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    optimizer = PerParameterOptimizer(options, [{"params": [weight], "lr": 2 ** -10}], fused=False,
                                      bf16_weights=True)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert weight.dtype == torch.bfloat16 and weight.grad is None
    values = weight.detach().float()
    assert set(values.unique().tolist()) == {1.0 - 2 ** -8, 1.0}
    assert (values < 1).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert values.mean().item() == pytest.approx(1.0 - 2 ** -10, abs=3e-5)


def test_a_resume_on_bf16_weights_keeps_the_fp32_optimizer_state():
    # torch casts a loaded optimizer state to its parameter's dtype; the state belongs to the fp32 copies
    # that each step works on, and AdamW cannot step a bf16 state with an fp32 gradient.
    options = cfg.from_dict(tiny_config("/tmp")).optimizer
    weight = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))

    def optimizer():
        return PerParameterOptimizer(options, [{"params": [weight], "lr": 1e-3}], fused=False, bf16_weights=True)

    first = optimizer()
    weight.grad = torch.ones_like(weight)
    first.step()
    resumed = optimizer()
    resumed.load_state_dict(first.state_dict())
    saved, loaded = first.optimizers[0].state[weight], resumed.optimizers[0].state[weight]
    assert loaded["exp_avg"].dtype == torch.float32 and torch.equal(loaded["exp_avg"], saved["exp_avg"])
    assert weight.dtype == torch.bfloat16
    weight.grad = torch.ones_like(weight)
    resumed.step()
    assert weight.dtype == torch.bfloat16 and weight.grad is None


def test_bf16_weights_train_and_are_saved_in_bf16(tmp_path, class_images, tiny_model):
    weights, watch = train_and_read_unet(tmp_path, weights_dtype="bf16", **{"optimizer.fused_backward": True})
    # The UNet held bf16 weights while it trained, not only when it was saved.
    assert all(batch.dtypes == {torch.bfloat16} for batch in watch.batches)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    # The norm layers' weights start at exactly 1.0, where bf16 steps down by 2**-8: every update of this
    # run (about lr, at most 6e-4) is under half of that, so round-to-nearest would keep each of them at
    # 1.0; stochastic rounding moves a share of them proportional to the update.
    initial = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    at_one = {k: initial[k] == 1.0 for k in weights}
    ones = sum(mask.sum().item() for mask in at_one.values())
    moved = sum((weights[k][at_one[k]] != 1.0).sum().item() for k in weights)
    assert ones > 1000 and moved > 0.03 * ones
    # Late in every backward after the first, the weights of the watched layers have moved.
    assert all(batch.moved > 0 for batch in watch.batches[1:])


def test_fused_backward_refuses_global_clipping():
    values = tiny_config("/tmp", **{"optimizer.fused_backward": True, "trainer.gradient_clip_val": 1.0})
    with pytest.raises(cfg.ConfigError, match="cannot be combined with 'trainer.gradient_clip_val'"):
        cfg.from_dict(values)
