"""Memory-saving switches give the same training result where they must."""
import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoints, events
from engine import config as cfg
from engine.optim import stochastic_round_to_bf16
from engine.testing import tiny_config
from engine.train import Trainer


def train_and_read_unet(output_dir, **overrides):
    values = tiny_config(output_dir, **{"trainer.max_steps": 4, "sampling.interval_steps": 0,
                                        "checkpoint.every_n_train_steps": 4, **overrides})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished), result
    (run_dir,) = (output_dir / "tiny-demo").iterdir()
    newest = checkpoints.latest_checkpoint(run_dir)
    return load_file(newest / "unet" / "diffusion_pytorch_model.safetensors")


def largest_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# Per-parameter AdamW does the same arithmetic as one AdamW over all parameters; only the order of
# floating-point operations may differ.
TOLERANCE = 1e-6


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fused_backward_matches_the_normal_optimizer_step(tmp_path, class_images, accumulation):
    shared = {"trainer.accumulate_grad_batches": accumulation}
    normal = train_and_read_unet(tmp_path / "normal", **shared)
    fused = train_and_read_unet(tmp_path / "fused", **{"optimizer.fused_backward": True, **shared})
    assert largest_difference(normal, fused) <= TOLERANCE


def test_gradient_checkpointing_does_not_change_the_result(tmp_path, class_images):
    plain = train_and_read_unet(tmp_path / "plain")
    checkpointed = train_and_read_unet(tmp_path / "checkpointed", gradient_checkpointing=True)
    assert largest_difference(plain, checkpointed) <= TOLERANCE


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not():
    value = torch.full((200_000,), 1.0 + 2 ** -10)  # between two bf16 neighbours (1 and 1 + 2**-7)
    nearest = value.to(torch.bfloat16).float()
    rounded = stochastic_round_to_bf16(value, torch.Generator().manual_seed(0)).float()
    assert nearest.unique().tolist() == [1.0]
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2 ** -10, abs=2e-5)


def test_bf16_weights_train_and_are_saved_in_bf16(tmp_path, class_images):
    weights = train_and_read_unet(tmp_path, weights_dtype="bf16", **{"optimizer.fused_backward": True})
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_fused_backward_refuses_global_clipping():
    values = tiny_config("/tmp", **{"optimizer.fused_backward": True, "trainer.gradient_clip_val": 1.0})
    with pytest.raises(cfg.ConfigError, match="cannot be combined with 'trainer.gradient_clip_val'"):
        cfg.from_dict(values)
