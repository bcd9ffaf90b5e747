"""The SDXL family on the tiny SDXL model: training, micro-conditioning from the real crop geometry,
exact resume, the text encoders' conditioning, and refusals of configs that cannot work."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from safetensors.torch import load_file

from conftest import kill_at_checkpoint, run_cli, train_here
from engine import checkpoints
from engine import config as cfg
from engine.data.index import ImageRecord
from engine.errors import UserError
from engine.testing import tiny_config

WEIGHT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
                "text_encoder_2": "text_encoder_2/model.safetensors"}


def sdxl_values(output_dir, **overrides):
    """Native fine-tuning of the tiny SDXL model on the captioned shapes, with buckets and random crops."""
    return tiny_config(output_dir, **{
        "model": "demo:tiny-sdxl", "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/finetune", "prompt": "{TXT_PROMPT}"}}],
        "data.center_crop": False, "aspect_ratio_bucket.enabled": True, "train_text_encoder": True,
        "sampling.interval_steps": 0, **overrides})


def only_run(output_dir):
    (run,) = sorted((output_dir / "tiny-demo").iterdir())
    return run


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sdxl_trains_all_three_models_and_resume_after_sigkill_is_exact(tmp_path, sample_data, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tiny model's ops are too small to split over threads
    values = sdxl_values(tmp_path / "reference", **{"trainer.max_steps": 10, "checkpoint.every_n_train_steps": 5})
    train_here(values)
    reference = only_run(tmp_path / "reference")
    losses = [m["loss"] for m in metrics_of(reference)]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]), losses

    killed_values = {**values, "output_dir": str(tmp_path / "killed")}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(killed_values))
    kill_at_checkpoint(tmp_path / "b.yaml", "step-00000005")
    run_dir = only_run(tmp_path / "killed")
    resumed = run_cli("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in metrics_of(run_dir)] == list(range(1, 11))

    expected_checkpoint = checkpoints.latest_checkpoint(reference)
    actual_checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(actual_checkpoint)["trained"] == ["text_encoder", "text_encoder_2", "unet"]
    base = load_file(sample_data.parent / "tiny-sdxl" / WEIGHT_FILES["text_encoder_2"])
    for name, file in WEIGHT_FILES.items():
        expected, actual = load_file(expected_checkpoint / file), load_file(actual_checkpoint / file)
        assert expected.keys() == actual.keys()
        worst = max((expected[k] - actual[k]).abs().max().item() for k in expected)
        assert worst <= 1e-6, (name, worst)
    trained_second = load_file(actual_checkpoint / WEIGHT_FILES["text_encoder_2"])
    assert any(not torch.equal(base[k], trained_second[k]) for k in base)


def test_micro_conditioning_is_each_images_real_size_crop_and_target(tmp_path, tiny_sdxl):
    from engine.data.buckets import cover_resize
    from engine.data.prepare import prepare_data
    from engine.models.family import family_for
    from engine.step import StepModels, compute_loss

    config = cfg.from_dict(sdxl_values(tmp_path, batch_size=1, **{"data.resolution": 64}))
    family = family_for(config)
    assert family.name == "sdxl"
    components = family.load(config)
    data = prepare_data(config, components.tokenizer, config.seed)
    dataset = data.dataset
    seen = []
    real_forward = components.unet.forward

    def recording(*args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].clone())
        return real_forward(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    components.unet.forward = recording
    models = StepModels(family=family, unet=components.unet, text_encoder=components.text_encoder,
                        vae=components.vae,
                        objective=family.objective(config, components.noise_scheduler))
    cropped_somewhere = False
    for index in range(6):
        record = dataset.instances[index]
        batch = data.loader.collate_fn([dataset[index]])
        height_, width_ = batch["pixel_values"].shape[-2:]
        original_h, original_w, top, left, target_h, target_w = batch["time_ids"][0].tolist()
        with Image.open(record.path) as image:
            image = image.convert("RGB")
        assert (original_w, original_h) == image.size == (record.width, record.height)
        assert (target_w, target_h) == (width_, height_) == dataset.sizes[dataset.instance_buckets[index]]
        # The pixels trained are the image resized to cover the target and cropped at exactly (top, left).
        _, resized_w, resized_h = cover_resize(image.size, (int(target_w), int(target_h)))
        resized = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
        crop = np.asarray(resized.crop((int(left), int(top), int(left + target_w), int(top + target_h))),
                          dtype=np.float32) / 127.5 - 1.0
        assert np.allclose(batch["pixel_values"][0].permute(1, 2, 0).numpy(), crop, atol=1e-6)
        cropped_somewhere |= top > 0 or left > 0
        with torch.no_grad():
            compute_loss(config, models, batch, torch.device("cpu"), None)
        assert torch.equal(seen[-1], batch["time_ids"])
    assert cropped_somewhere, "random crops of the sample images should start past the corner at least once"


class _Tokenizer:
    model_max_length = 77

    def __call__(self, text, truncation=True, max_length=77):
        return type("Tokens", (), {"input_ids": [1, 2]})()


def _noise_image(path, size):
    """An image with no symmetry, so that a mirrored crop never equals an unmirrored one."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return ImageRecord(str(path), *size)


def _examples(records, augment, center_crop):
    from engine.data.dataset import DreamBoothDataset

    steps = cfg.from_dict({"prior_preservation": {"enabled": False}, "augment": augment}).augment
    dataset = DreamBoothDataset(records, [0] * len(records), [(48, 48)], _Tokenizer(), center_crop=center_crop,
                                seed=5, augment=steps)
    return [dataset[index]["instance"] for index in range(len(records))]


def test_a_flipped_samples_crop_left_is_mirrored_in_the_resized_image(tmp_path):
    from engine.data.dataset import to_tensor

    # 101x60 covers 48x48 resized to 81x48: the centre crop starts at 16 of the 33 spare columns, 17 from
    # the right.
    record = _noise_image(tmp_path / "wide.png", (101, 60))
    (plain,) = _examples([record], [], True)
    (unflipped,) = _examples([record], [{"name": "hflip", "p": 0.0}], True)
    (flipped,) = _examples([record], [{"name": "hflip", "p": 1.0}], True)
    assert plain["time_ids"] == unflipped["time_ids"] == [60, 101, 0, 16, 48, 48]
    assert flipped["time_ids"] == [60, 101, 0, 17, 48, 48]
    # Each example's pixels are the crop its time_ids name, of the resized image or of its mirror image.
    with Image.open(record.path) as image:
        resized = image.convert("RGB").resize((81, 48), Image.Resampling.BICUBIC)
    assert torch.equal(unflipped["pixel_values"], to_tensor(resized.crop((16, 0, 64, 48))))
    assert torch.equal(flipped["pixel_values"], to_tensor(ImageOps.mirror(resized).crop((17, 0, 65, 48))))


def test_random_flips_mirror_the_crop_left_of_exactly_the_flipped_rows(tmp_path):
    # 160x60 covers 48x48 resized to 128x48: random crops start anywhere in the 80 spare columns.
    record = _noise_image(tmp_path / "wide.png", (160, 60))
    records = [record] * 24
    # hflip draws its number whatever p is, so both datasets draw the same crops.
    never = _examples(records, [{"name": "hflip", "p": 0.0}], False)
    random = _examples(records, [{"name": "hflip", "p": 0.5}], False)
    flipped = []
    for row, (plain, example) in enumerate(zip(never, random)):
        mirrored = torch.equal(example["pixel_values"], plain["pixel_values"].flip(-1))
        assert mirrored or torch.equal(example["pixel_values"], plain["pixel_values"]), row
        original_h, original_w, top, left, target_h, target_w = plain["time_ids"]
        assert (original_h, original_w, target_h, target_w) == (60, 160, 48, 48) and top == 0
        expected_left = 80 - left if mirrored else left
        assert example["time_ids"] == [60, 160, 0, expected_left, 48, 48], row
        flipped.append(mirrored)
    assert 0 < sum(flipped) < len(flipped)
    assert any(f and plain["time_ids"][3] != 40 for f, plain in zip(flipped, never))  # not all central


def test_sdxl_conditioning_is_both_encoders_penultimate_layers_and_the_pooled_projection(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    from engine.models.sdxl import StableDiffusionXL

    config = cfg.from_dict({"model": str(tiny_sdxl), "prior_preservation": {"enabled": False}})
    family = StableDiffusionXL()
    components = family.load(config)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    prompt = "a red circle on a white background"
    ids = components.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        ours = family.encode_text(components.text_encoder, ids, 1)
        skip2 = family.encode_text(components.text_encoder, ids, 2)
        theirs, _, pooled, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (1, 77, 96) and ours["text_embeds"].shape == (1, 64)
    assert torch.allclose(ours["encoder_hidden_states"], theirs, atol=1e-6)
    assert torch.allclose(ours["text_embeds"], pooled, atol=1e-6)
    assert not torch.allclose(skip2["encoder_hidden_states"], theirs, atol=1e-3)
    assert torch.equal(skip2["text_embeds"], ours["text_embeds"])  # the pooled embedding ignores CLIP skip


def test_a_sd1_tokenizer_with_an_sdxl_model_is_refused_naming_the_key(tmp_path, tiny_model, tiny_sdxl):
    from engine.models.family import family_for

    config = cfg.from_dict({"model": str(tiny_sdxl), "tokenizer": str(tiny_model),
                            "prior_preservation": {"enabled": False}})
    with pytest.raises(UserError, match="config key 'tokenizer'"):
        family_for(config).load(config)


def test_a_resolution_far_below_the_native_size_warns_naming_the_key(tiny_sdxl):
    from engine import notices
    from engine.models.family import family_for

    warned = []
    config = cfg.from_dict({"model": str(tiny_sdxl), "prior_preservation": {"enabled": False},
                            "data": {"resolution": 24}})
    with notices.collect(warned.append):
        family_for(config).load(config)
    assert any("config key 'data.resolution'" in str(w) for w in warned)
    warned.clear()
    config = cfg.from_dict({"model": str(tiny_sdxl), "prior_preservation": {"enabled": False},
                            "data": {"resolution": 64}})
    with notices.collect(warned.append):
        family_for(config).load(config)
    assert not any("data.resolution" in str(w) for w in warned)


@pytest.mark.parametrize("force_upcast, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_samples_decode_outside_half_precision_unless_the_vae_says_it_is_safe(tiny_sdxl, force_upcast, expected):
    from engine.models.sdxl import StableDiffusionXL
    from engine.sampling import PromptEncoder, render

    config = cfg.from_dict({"model": str(tiny_sdxl), "prior_preservation": {"enabled": False}})
    family = StableDiffusionXL()
    components = family.load(config)
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    pipeline.to(dtype=torch.bfloat16)  # as class generation runs on a GPU, in half precision
    components.vae.register_to_config(force_upcast=force_upcast)
    decoded = []
    real_decode = components.vae.decode
    components.vae.decode = lambda latents, **kw: decoded.append((latents.dtype, components.vae.dtype)) or \
        real_decode(latents, **kw)
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    images = render(pipeline, encoder, ["a red circle"], [""], num_inference_steps=2, width=64, height=64)
    assert decoded == [(expected, expected)] and images[0].size == (64, 64)
    assert components.vae.dtype == torch.bfloat16  # back as it was
