"""Training options: each one changes what is computed, and each trains the tiny model from the CLI."""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from engine import config as cfg
from engine.augment import largest_rotated_rect, process_caption, rotate_and_crop


def test_v_prediction_target_is_the_schedulers_velocity():
    from diffusers import DDPMScheduler

    from engine.losses import training_target

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    target = training_target(scheduler, latents, noise, timesteps, "v_prediction")
    alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(target, alpha.sqrt() * noise - (1 - alpha).sqrt() * latents, atol=1e-6)
    assert torch.equal(training_target(scheduler, latents, noise, timesteps, "epsilon"), noise)


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler

    from engine.losses import min_snr_weights

    scheduler = DDPMScheduler()
    timesteps = torch.tensor([0, 100, 400, 999])
    alpha = scheduler.alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0, "epsilon"), expected, rtol=1e-5)
    expected_v = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0, "v_prediction"), expected_v, rtol=1e-5)
    assert min_snr_weights(scheduler, timesteps, 5.0, "epsilon")[-1] == pytest.approx(1.0)


def test_weighted_loss_scales_each_row():
    from engine.losses import dreambooth_loss

    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    loss, _, _ = dreambooth_loss(pred, target, 2, 1.0, weights=torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx(2.0)


def test_ema_after_k_steps_equals_the_closed_form():
    from engine.config import Ema
    from engine.ema import create_ema, ema_step

    model = torch.nn.Linear(3, 3)

    class Unet(torch.nn.Module):
        config = {}

        def __init__(self):
            super().__init__()
            self.linear = model

    unet = Unet()
    ema = create_ema(unet, Ema(enabled=True, decay=0.9))
    initial = model.weight.detach().clone()
    ema_step(ema, unet.parameters(), on_cpu=False)  # step 1 copies the weights
    with torch.no_grad():
        model.weight.fill_(2.0)
    steps = 6
    for _ in range(steps - 1):
        ema_step(ema, unet.parameters(), on_cpu=True)
    factor = 1.0
    for k in range(2, steps + 1):
        factor *= min(0.9, k / (9 + k))
    expected = 2.0 + (initial - 2.0) * factor
    assert torch.allclose(ema.shadow_params[0], expected, atol=1e-6)


def test_shuffled_tags_keep_their_first_tokens():
    from engine.config import Captions

    caption = "sks, 1girl, red hair, smile, outdoors, hat, looking at viewer"
    options = Captions(shuffle_tags=True, keep_tokens=2)
    orders = set()
    for seed in range(20):
        out = process_caption(caption, options, np.random.default_rng(seed)).split(", ")
        assert out[:2] == ["sks", "1girl"]
        assert sorted(out) == sorted(caption.split(", "))
        orders.add(tuple(out))
    assert len(orders) > 5
    dropped = process_caption(caption, Captions(tag_dropout=1.0, keep_tokens=1), np.random.default_rng(0))
    assert dropped == "sks"


def test_rotation_crops_away_the_empty_corners():
    from PIL import Image

    w, h = largest_rotated_rect(100, 60, np.radians(10))
    assert 0 < w < 100 and 0 < h < 60
    image = Image.new("RGB", (100, 60), (255, 255, 255))
    rotated = rotate_and_crop(image, 10)
    array = np.asarray(rotated)
    assert array.min() == 255  # no black fill left inside the crop
    assert rotated.size == (int(w), int(h))


def test_uncond_with_p1_gives_the_empty_prompt_embedding(tiny_model, sample_data):
    from engine.data import Collate, DreamBoothDataset, ImageRecord
    from engine.models import encode_prompt, load_components

    components = load_components(str(tiny_model))
    image = next((sample_data / "instance").glob("*.png"))
    dataset = DreamBoothDataset([ImageRecord(str(image), 96, 96, "sks toy")], [0], [(64, 64)],
                                components.tokenizer, center_crop=True, seed=0, uncond_p=1.0)
    batch = Collate(components.tokenizer.pad_token_id, 77, True)([dataset[0]])
    empty = components.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(batch["input_ids"], empty)
    with torch.no_grad():
        assert torch.equal(encode_prompt(components.text_encoder, batch["input_ids"]),
                           encode_prompt(components.text_encoder, empty))


def test_a_loaded_embedding_changes_the_encoding_of_its_token(tiny_model, tmp_path):
    from safetensors.torch import save_file

    from engine.embeddings import expand_tokens, load_custom_embeddings
    from engine.models import encode_prompt, load_components

    components = load_components(str(tiny_model))
    tokenizer, encoder = components.tokenizer, components.text_encoder
    prompt = "a photo of mystyle"
    before_ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = encode_prompt(encoder, before_ids)
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "mystyle.safetensors"))
    expansions = load_custom_embeddings(str(tmp_path), tokenizer, encoder)
    assert expansions == {"mystyle": "mystyle mystyle_1"}
    expanded = expand_tokens(prompt, expansions)
    ids = tokenizer([expanded], padding="max_length", max_length=77, return_tensors="pt").input_ids
    new_ids = tokenizer.convert_tokens_to_ids(["mystyle", "mystyle_1"])
    assert ids[0, 4:6].tolist() == new_ids
    with torch.no_grad():
        after = encode_prompt(encoder, ids)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("overrides", [
    ["ema.enabled=true", "ema.use_for_samples=true"],
    ["noise_offset=0.05"],
    ["min_snr_gamma=5"],
    ["uncond.enabled=true", "uncond.p=0.5"],
    ["captions.shuffle_tags=true", "captions.keep_tokens=1"],
    ["prediction_type=v_prediction", "zero_terminal_snr=true"],
    ["augment=[{name: hflip, p: 0.5}, {name: rotate, degrees: 8, p: 1.0}, {name: color_jitter, p: 1.0}]"],
])
def test_each_option_trains_from_the_cli(tmp_path, class_images, overrides):
    args = ["train", "--config", "presets/tiny-demo-cpu.yaml", "--set", f"output_dir={tmp_path}",
            "--set", "trainer.max_steps=4", "--set", "sampling.interval_steps=4"]
    for override in overrides:
        args += ["--set", override]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "tiny-demo").iterdir()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(np.isfinite(m["loss"]) for m in metrics)
    saved = cfg.load(run_dir / "config.yaml")
    key, value = overrides[0].split("=", 1)
    node = cfg.to_dict(saved)
    for part in key.split("."):
        node = node[part]
    assert node not in (None, False, 0, [])
    if overrides[0].startswith("ema"):
        assert (sorted((run_dir / "checkpoints").iterdir())[-1] / "ema_unet").is_dir()


def test_min_snr_stays_finite_at_zero_terminal_snr():
    from diffusers import DDPMScheduler

    from engine.losses import min_snr_weights

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    weights = min_snr_weights(scheduler, torch.tensor([0, 500, 999]), 5.0, "epsilon")
    assert torch.isfinite(weights).all() and weights[-1].item() == 1.0


def test_ema_of_bf16_weights_is_kept_in_fp32_and_moves():
    from engine.config import Ema
    from engine.ema import create_ema, ema_step

    class Unet(torch.nn.Module):
        config = {}

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4).to(torch.bfloat16)

    unet = Unet()
    with torch.no_grad():
        unet.linear.weight.fill_(1.0)
    ema = create_ema(unet, Ema(enabled=True, decay=0.9999))
    assert ema.shadow_params[0].dtype == torch.float32
    ema_step(ema, unet.parameters(), on_cpu=False)
    with torch.no_grad():
        unet.linear.weight.fill_(2.0)
    for _ in range(20):
        ema_step(ema, unet.parameters(), on_cpu=False)
    assert 1.0 < ema.shadow_params[0].mean().item() < 2.0
