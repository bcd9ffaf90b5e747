"""Training options: each one changes what is computed, and each reaches the trainer's step.

The formula tests check the helpers on their own. The end-to-end tests train the tiny model for a step or
three and look at what the step really fed its models (through PyTorch module hooks and the noise
scheduler's add_noise) and at what it logged and saved, against the same run with the option off (same
seed) or against the value the option must produce, computed here from the recorded tensors. Each of them
fails if the trainer ignored the option.
"""
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from engine import checkpoints, events
from engine import config as cfg
from engine.data.augment import largest_rotated_rect, process_caption, rotate_and_crop
from engine.testing import tiny_config


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
    from engine.data.dataset import Collate, DreamBoothDataset, ImageRecord
    from engine.models.sd import encode_prompt, load_components

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

    from engine.models.embeddings import expand_tokens, load_custom_embeddings
    from engine.models.sd import encode_prompt, load_components

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


# -- end to end: what the trainer's step computed --------------------------------------------------------

@dataclass
class Forward:
    """One training micro-batch as the step's models saw it."""
    pixels: Optional[torch.Tensor]     # the VAE encoder's input, [-1, 1]
    input_ids: Optional[torch.Tensor]  # the text encoder's input
    latents: torch.Tensor              # add_noise's clean latents, noise and timesteps
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor                # the UNet's inputs and its prediction
    context: torch.Tensor
    prediction: torch.Tensor
    text_encoder: object = None


@dataclass
class Run:
    run_dir: Path
    losses: list                       # metrics.jsonl, one per optimizer step
    forwards: list = field(default_factory=list)

    @property
    def first(self) -> Forward:
        return self.forwards[0]

    def unet_weights(self, checkpoint: Optional[Path] = None) -> dict:
        from safetensors.torch import load_file

        checkpoint = checkpoint or checkpoints.latest_checkpoint(self.run_dir)
        return load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")


def _argument(args, kwargs, index, name):
    return args[index] if len(args) > index else kwargs[name]


class StepRecorder:
    """Records each training forward through a global module hook and a wrapped DDPMScheduler.add_noise.

    The VAE encoder, the text encoder and add_noise run before the UNet in a step; their inputs wait in
    `pending` until the UNet (in training mode: sampling and class generation run it in eval mode) takes
    them into one Forward.
    """

    def __init__(self):
        self.forwards: list[Forward] = []
        self.pending: dict = {}

    def hook(self, module, args, kwargs, output):
        from diffusers import UNet2DConditionModel
        from diffusers.models.autoencoders.vae import Encoder
        from transformers import CLIPTextModel

        if isinstance(module, Encoder):
            # the VAE encodes a batch one image at a time: the rows arrive one by one
            rows = [self.pending["pixels"]] if "pixels" in self.pending else []
            self.pending["pixels"] = torch.cat(rows + [args[0].detach().clone()])
        elif isinstance(module, CLIPTextModel):
            self.pending["input_ids"] = _argument(args, kwargs, 0, "input_ids").detach().clone()
            self.pending["text_encoder"] = module
        elif isinstance(module, UNet2DConditionModel):
            if module.training and "noise" in self.pending:
                self.forwards.append(Forward(
                    pixels=self.pending.get("pixels"), input_ids=self.pending.get("input_ids"),
                    text_encoder=self.pending.get("text_encoder"), latents=self.pending["latents"],
                    noise=self.pending["noise"], timesteps=self.pending["timesteps"],
                    noisy=_argument(args, kwargs, 0, "sample").detach().clone(),
                    context=_argument(args, kwargs, 2, "encoder_hidden_states").detach().float().clone(),
                    prediction=output.sample.detach().float().clone()))
            self.pending = {}

    def __enter__(self) -> "StepRecorder":
        from diffusers import DDPMScheduler

        original = DDPMScheduler.add_noise

        def add_noise(scheduler, original_samples, noise, timesteps):
            self.pending.update(latents=original_samples.detach().clone(), noise=noise.detach().clone(),
                                timesteps=timesteps.detach().clone())
            return original(scheduler, original_samples, noise, timesteps)

        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(DDPMScheduler, "add_noise", add_noise)
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.patch.undo()


def train(output_dir: Path, steps: int = 1, **overrides) -> Run:
    """Train the tiny preset for `steps` optimizer steps (sampling off) and record every forward."""
    from engine.train import Trainer

    values = tiny_config(output_dir, **{"trainer.max_steps": steps, "sampling.interval_steps": 0, **overrides})
    with StepRecorder() as recorder:
        result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished) and result.step == steps, result
    run_dir = Path(result.run_dir)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == steps and len(recorder.forwards) == steps  # no accumulation: one forward a step
    return Run(run_dir, losses, recorder.forwards)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, class_images):
    """One step of the preset with every option off; the option runs below share its seed and data."""
    return train(tmp_path_factory.mktemp("baseline"))


@pytest.fixture(scope="module")
def alphas_cumprod(tiny_model):
    """ᾱ_t of the tiny model's own training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(tiny_model / "scheduler").alphas_cumprod.double()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


def dreambooth_mse(prediction, target, weights=None) -> float:
    """The preset's loss, written out: each row's mean squared error (times its weight), averaged over
    the instance rows plus the same over the class rows that follow them (prior_loss_weight 1)."""
    per_row = ((prediction.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    if weights is not None:
        per_row = per_row * weights.double()
    half = len(per_row) // 2  # prior preservation pairs every instance row with a class row
    return (per_row[:half].mean() + per_row[half:].mean()).item()


def scaled(alphas, timesteps):
    return alphas[timesteps].view(-1, 1, 1, 1)


def same_draws(run: Run, baseline: Run) -> None:
    """The option run's first step drew the baseline's latents and timesteps and predicted from the same
    inputs, so any difference in it comes from the option."""
    assert torch.equal(run.first.timesteps, baseline.first.timesteps)
    assert torch.allclose(run.first.latents, baseline.first.latents, atol=1e-6)


def test_the_default_step_is_the_mse_against_the_noise(baseline, alphas_cumprod):
    # The reference computation that the option tests below build on: x_t = √ᾱ x₀ + √(1-ᾱ) ε and the
    # logged loss is the DreamBooth MSE of the prediction against ε.
    first = baseline.first
    a = scaled(alphas_cumprod, first.timesteps)
    assert torch.allclose(first.noisy.double(), a.sqrt() * first.latents + (1 - a).sqrt() * first.noise, atol=1e-5)
    assert baseline.losses[0] == pytest.approx(dreambooth_mse(first.prediction, first.noise), rel=1e-5)


def test_noise_offset_adds_a_per_channel_constant_to_the_noise(baseline, tmp_path):
    run = train(tmp_path, noise_offset=0.1)
    same_draws(run, baseline)
    shift = run.first.noise - baseline.first.noise
    # The offset is one value per row and latent channel, the same at every pixel, of size ~ 0.1.
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)
    assert 0.01 < per_channel.abs().max().item() < 0.5
    assert run.losses[0] == pytest.approx(dreambooth_mse(run.first.prediction, run.first.noise), rel=1e-5)
    assert run.losses[0] != pytest.approx(baseline.losses[0], rel=1e-4)


def test_min_snr_gamma_weights_each_rows_loss(baseline, alphas_cumprod, tmp_path):
    # γ = 1: this step's timesteps all have an SNR under the usual 5, which would weigh nothing down.
    run = train(tmp_path, min_snr_gamma=1.0)
    same_draws(run, baseline)
    assert torch.allclose(run.first.prediction, baseline.first.prediction, atol=1e-6)
    alpha = alphas_cumprod[run.first.timesteps]
    snr = alpha / (1 - alpha)
    weights = torch.minimum(snr, torch.full_like(snr, 1.0)) / snr
    assert weights.min() < 0.9  # some row of this step is down-weighted, so the loss must move
    expected = dreambooth_mse(run.first.prediction, run.first.noise, weights)
    assert run.losses[0] == pytest.approx(expected, rel=1e-5)
    assert run.losses[0] != pytest.approx(baseline.losses[0], rel=1e-3)


def test_v_prediction_trains_against_the_velocity(baseline, alphas_cumprod, tmp_path):
    run = train(tmp_path, prediction_type="v_prediction")
    same_draws(run, baseline)
    first = run.first
    a = scaled(alphas_cumprod, first.timesteps)
    velocity = a.sqrt() * first.noise.double() - (1 - a).sqrt() * first.latents.double()
    assert run.losses[0] == pytest.approx(dreambooth_mse(first.prediction, velocity), rel=1e-5)
    assert run.losses[0] != pytest.approx(dreambooth_mse(first.prediction, first.noise), rel=1e-3)
    meta = checkpoints.read_meta(checkpoints.latest_checkpoint(run.run_dir))
    assert meta["prediction_type"] == "v_prediction"  # what sampling from the checkpoint must use


def test_zero_terminal_snr_rescales_the_training_schedule(baseline, alphas_cumprod, tmp_path):
    run = train(tmp_path, prediction_type="v_prediction", zero_terminal_snr=True)
    same_draws(run, baseline)
    # Lin et al. (2023), algorithm 1: shift √ᾱ so that its last value is 0, scale it to keep the first.
    root = alphas_cumprod.sqrt()
    rescaled = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    assert rescaled[-1] == 0
    first = run.first
    a = scaled(rescaled, first.timesteps)
    x0, eps = first.latents.double(), first.noise.double()
    assert torch.allclose(first.noisy.double(), a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    assert not torch.allclose(first.noisy, baseline.first.noisy, atol=1e-4)
    velocity = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert run.losses[0] == pytest.approx(dreambooth_mse(first.prediction, velocity), rel=1e-5)


def test_clip_skip_feeds_the_penultimate_layer_to_the_unet(baseline, tmp_path):
    run = train(tmp_path, clip_stop_at_layer=2)
    same_draws(run, baseline)
    first = run.first
    assert torch.equal(first.input_ids, baseline.first.input_ids)
    # CLIP skip 2 is the text encoder without its last layer (the final layer norm still applies).
    full = first.text_encoder
    skipped = copy.deepcopy(full)
    del getattr(skipped, "text_model", skipped).encoder.layers[-1]
    with torch.no_grad():
        expected = skipped(first.input_ids).last_hidden_state
        last_layer = full(first.input_ids).last_hidden_state
    assert torch.allclose(first.context, expected, atol=1e-5)
    assert torch.allclose(baseline.first.context, last_layer, atol=1e-5)
    assert not torch.allclose(first.context, last_layer, atol=1e-3)
    assert run.losses[0] != pytest.approx(baseline.losses[0], rel=1e-4)


@pytest.mark.parametrize("cond", ["zeros", "bos", "eos"])
def test_uncond_trains_on_the_unconditional_embedding(baseline, tokenizer, tmp_path, cond):
    run = train(tmp_path, **{"uncond.enabled": True, "uncond.p": 1.0, "uncond.cond": cond})
    first = run.first
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    # p = 1 drops every caption, the class rows' too.
    assert torch.equal(first.input_ids, empty.expand_as(first.input_ids))
    assert not torch.equal(baseline.first.input_ids, first.input_ids)
    if cond == "zeros":
        assert first.context.abs().max().item() == 0.0
    else:  # bos and eos: the encoding of the empty prompt, which starts with BOS and ends with EOS
        with torch.no_grad():
            expected = first.text_encoder(empty).last_hidden_state
        assert torch.allclose(first.context, expected.expand_as(first.context), atol=1e-6)
        assert first.context.abs().max().item() > 0.1
    assert not torch.allclose(first.context, baseline.first.context, atol=1e-3)


def fed_tags(tokenizer, input_ids) -> list[list[str]]:
    """The comma-separated tags of each row's prompt, read back from the ids the text encoder got."""
    texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    return [[tag.strip().replace(" ", "") for tag in text.split(",")] for text in texts]


def test_tag_shuffle_and_dropout_change_the_prompts_the_step_encodes(tokenizer, tmp_path, class_images):
    tags = ["sks", "red", "round", "shiny", "small", "toy"]
    prompt = ", ".join(tags)
    assert fed_tags(tokenizer, tokenizer([prompt]).input_ids) == [tags]  # the read-back is faithful
    run = train(tmp_path, steps=2, **{"data.concepts[0].instance_set.prompt": prompt,
                                      "captions.shuffle_tags": True, "captions.keep_tokens": 1,
                                      "captions.tag_dropout": 0.3})
    fed = []
    for forward in run.forwards:
        rows = fed_tags(tokenizer, forward.input_ids)
        half = len(rows) // 2
        assert rows[half:] == [["toy"]] * half  # the class prompt has no tags to shuffle
        fed += rows[:half]
    for row in fed:
        assert row[0] == "sks"  # keep_tokens
        assert len(set(row)) == len(row) and set(row) <= set(tags)
    # Ignoring tag_dropout would feed all six tags every time; ignoring shuffle_tags would keep the
    # surviving tags in their written order.
    assert any(len(row) < len(tags) for row in fed)
    assert any(row != sorted(row, key=tags.index) for row in fed)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.double() + 1) * 127.5).round()


def test_hflip_and_brightness_jitter_reach_the_encoded_pixels(baseline, tmp_path):
    run = train(tmp_path, augment=[{"name": "hflip", "p": 1.0},
                                   {"name": "color_jitter", "p": 1.0, "brightness": 0.3, "contrast": 0.0,
                                    "saturation": 0.0}])
    flipped = to_uint8(baseline.first.pixels).flip(-1)
    jittered = to_uint8(run.first.pixels)
    assert jittered.shape == flipped.shape
    for row, (source, out) in enumerate(zip(flipped, jittered)):
        # Brightness scales every channel of the mirrored image by one factor in [0.7, 1.3] (clipped at
        # 255 and rounded to 8 bits), read off the pixels that did not clip.
        unclipped = (out < 254) & (source > 50)
        factor = (out[unclipped] / source[unclipped]).median().item()
        assert 0.7 <= factor <= 1.3 and abs(factor - 1) > 0.01, (row, factor)
        expected = (source * factor).clamp(max=255)
        assert (out - expected).abs().max().item() <= 1.01, row


def test_rotation_reaches_the_encoded_pixels(baseline, tmp_path):
    run = train(tmp_path, augment=[{"name": "rotate", "degrees": 10.0, "p": 1.0}])
    rotated, plain = run.first.pixels, baseline.first.pixels
    assert rotated.shape == plain.shape  # rotated, cropped and brought back to the training size
    half = len(plain) // 2
    for row in range(half):
        assert (rotated[row] - plain[row]).abs().mean().item() > 0.01
        assert (rotated[row] - plain[row].flip(-1)).abs().mean().item() > 0.01
        # The demo pictures have no black; the crop must have removed the rotation's black fill.
        assert not (rotated[row] < -0.75).all(dim=0).any(), row


def test_random_crop_takes_windows_off_centre(baseline, sample_data, tmp_path):
    from PIL import Image

    from engine.data.buckets import cover_resize
    from engine.data.dataset import load_image, to_tensor

    run = train(tmp_path, **{"data.center_crop": False})
    size = run.first.pixels.shape[-1]
    resized = []
    for path in sorted((sample_data / "instance").glob("*.png")):
        image = load_image(str(path))
        _, width, height = cover_resize(image.size, (size, size))
        resized.append(to_tensor(image.resize((width, height), Image.Resampling.BICUBIC)))
    half = len(run.first.pixels) // 2
    off_centre = 0
    for row in run.first.pixels[:half]:
        # Every instance row is an exact size x size window of one of the resized instance images.
        windows = [(left, top) for image in resized
                   for top in range(image.shape[1] - size + 1) for left in range(image.shape[2] - size + 1)
                   if torch.equal(image[:, top:top + size, left:left + size], row)]
        assert windows, "the row is no window of any instance image"
        off_centre += not any(torch.equal(row, plain) for plain in baseline.first.pixels[:half])
    assert off_centre > 0  # with center_crop on, each row would be the baseline's centre window


def test_custom_embedding_tokens_and_vectors_reach_the_text_encoder(tokenizer, tmp_path, class_images):
    from safetensors.torch import save_file

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": vectors}, str(tmp_path / "embeddings" / "mystyle.safetensors"))
    run = train(tmp_path / "out", **{"custom_embeddings.enabled": True,
                                     "custom_embeddings.path": str(tmp_path / "embeddings"),
                                     "data.concepts[0].instance_set.prompt": "mystyle toy"})
    first = run.first
    vocabulary = len(tokenizer)
    new_ids = [vocabulary, vocabulary + 1]  # the two added tokens: mystyle mystyle_1
    half = len(first.input_ids) // 2
    for row in first.input_ids[:half]:
        # Right after BOS: the prompt's first word, expanded to both tokens. Without the embedding the
        # tokenizer would spell "mystyle" with its own pieces, all below `vocabulary`.
        assert row[1:3].tolist() == new_ids
    assert not (first.input_ids[half:] >= vocabulary).any()  # the class prompt has no such token
    table = first.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == vocabulary + 2
    assert torch.equal(table[new_ids].detach(), vectors)


def test_ema_weights_follow_the_closed_form_of_the_trained_weights(tmp_path, class_images):
    steps = 3
    run = train(tmp_path, steps=steps, **{"ema.enabled": True, "checkpoint.every_n_train_steps": 1,
                                          "checkpoint.save_top_k": -1})
    saved = checkpoints.list_checkpoints(run.run_dir)
    assert len(saved) == steps
    trained = [run.unet_weights(checkpoint) for checkpoint in saved]
    from safetensors.torch import load_file

    ema = load_file(saved[-1] / "ema_unet" / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == trained[-1].keys()
    # The first update copies the weights; update k then keeps min(decay, k / (9 + k)) of the average.
    expected = {name: tensor.double() for name, tensor in trained[0].items()}
    for k in range(2, steps + 1):
        decay = min(0.9999, k / (9 + k))
        expected = {name: decay * expected[name] + (1 - decay) * trained[k - 1][name].double()
                    for name in expected}
    assert max((ema[n].double() - expected[n]).abs().max().item() for n in ema) < 1e-6
    # The average lags the trained weights, which moved at each step.
    assert max((ema[n].double() - trained[-1][n].double()).abs().max().item() for n in ema) > 1e-5


def test_a_timestep_range_trains_only_that_part_of_the_schedule(baseline, alphas_cumprod, tmp_path):
    run = train(tmp_path, min_timestep=600, max_timestep=610)
    steps = run.first.timesteps
    assert ((steps >= 600) & (steps < 610)).all()
    assert not ((baseline.first.timesteps >= 600) & (baseline.first.timesteps < 610)).all()
    a = scaled(alphas_cumprod, steps)
    assert torch.allclose(run.first.noisy.double(), a.sqrt() * run.first.latents + (1 - a).sqrt() * run.first.noise,
                          atol=1e-5)
    assert run.losses[0] == pytest.approx(dreambooth_mse(run.first.prediction, run.first.noise), rel=1e-5)


@pytest.mark.parametrize("values, message", [
    ({"min_timestep": 500, "max_timestep": 500}, "config keys 'min_timestep' and 'max_timestep'"),
    ({"min_timestep": -1}, "config key 'min_timestep': must be at least 0, got -1")])
def test_an_empty_timestep_range_is_refused(tmp_path, values, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.from_dict(tiny_config(tmp_path, **values))


def test_a_timestep_range_past_the_schedule_names_the_key(tmp_path, class_images):
    from engine.train import Trainer

    result = Trainer(cfg.from_dict(tiny_config(tmp_path, **{"max_timestep": 5000, "trainer.max_steps": 1,
                                                            "sampling.interval_steps": 0}))).run()
    assert isinstance(result, events.Failed) and result.user_error
    assert result.error.startswith("config key 'max_timestep': the model's noise schedule has 1000 timesteps")
