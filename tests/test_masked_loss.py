"""Masked training: each image's mask follows its geometry and weights its latent pixels' loss.

The end-to-end tests train the tiny model for one step (test_options.train records what the step fed its
models) on images and masks written here, and compare the logged loss with the weighted MSE computed
from the recorded tensors; each fails if the trainer ignored the masks.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine import config as cfg
from engine import notices
from engine.config import AugmentStep
from engine.losses import mask_weights
from test_options import train

SIDE = 64  # the tiny preset's resolution: 8 x 8 latents


def noise_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def half_mask(width: int, height: int) -> Image.Image:
    """White on the left half of the image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, :width // 2] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """images/: four noise pictures (64 x 64 and 128 x 64), each with a left-half mask beside it; zeros/ and
    ones/: all-black and all-white masks of the same names; class/: two class pictures without masks."""
    root = tmp_path_factory.mktemp("masked-data")
    rng = np.random.default_rng(0)
    for folder in ("images", "zeros", "ones", "class"):
        (root / folder).mkdir()
    for index, (width, height) in enumerate(((64, 64), (128, 64), (64, 64), (128, 64))):
        noise_image(rng, width, height).save(root / "images" / f"img_{index}.png")
        # the centre crop of a 128 x 64 image is its middle: still white on exactly its left half
        half_mask(width, height).save(root / "images" / f"img_{index}.mask.png")
        Image.new("L", (width, height), 0).save(root / "zeros" / f"img_{index}.png")
        Image.new("L", (width, height), 255).save(root / "ones" / f"img_{index}.png")
    for index in range(2):
        noise_image(rng, SIDE, SIDE).save(root / "class" / f"class_{index}.png")
    return root


def options(data: Path, prior: bool = True, **more) -> dict:
    return {"data.concepts[0].instance_set.path": str(data / "images"),
            "data.concepts[0].class_set.path": str(data / "class"),
            "data.concepts[0].class_set.auto_generate.enabled": False,
            "prior_preservation.enabled": prior,
            # lr from the first step (the preset warms up from 0, which would move no weight with any loss)
            "optimizer.lr_scheduler.warmup.enabled": False,
            "masked_loss.enabled": True, **more}


@pytest.fixture(scope="module")
def alphas_cumprod(tiny_model):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(tiny_model / "scheduler").alphas_cumprod.double()


def squared_error(forward, target=None) -> torch.Tensor:
    return (forward.prediction.double() - (forward.noise if target is None else target).double()) ** 2


# -- the weight map -----------------------------------------------------------------------------------------

def test_a_half_mask_weights_exactly_half_the_latent_pixels(data, tiny_model):
    from transformers import CLIPTokenizer

    from engine.data.dataset import Collate, DreamBoothDataset
    from engine.data.index import ImageRecord

    # 80 x 48: a width that is a multiple of 16, so its left half is exactly 5 of the 10 latent columns
    folder = data / "wide"
    folder.mkdir()
    noise_image(np.random.default_rng(1), 80, 48).save(folder / "wide.png")
    half_mask(80, 48).save(folder / "wide.mask.png")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    image, mask = str(folder / "wide.png"), str(folder / "wide.mask.png")
    dataset = DreamBoothDataset([ImageRecord(image, 80, 48, "sks")], [0], [(80, 48)], tokenizer, center_crop=True,
                                seed=0, masks={image: mask})
    batch = Collate(tokenizer.pad_token_id, 77, True)([dataset[0]])
    weights = mask_weights(batch["masks"], (6, 10), 0.0)
    assert weights.shape == (1, 1, 6, 10)
    assert (weights == 1).sum().item() == 30 and (weights == 0).sum().item() == 30
    assert (weights[..., :5] == 1).all() and (weights[..., 5:] == 0).all()
    assert torch.equal(mask_weights(batch["masks"], (6, 10), 0.25)[..., 5:], torch.full((1, 1, 6, 5), 0.25))
    # An area average, not a sample: an edge through the middle of a latent pixel gives it half.
    edge = torch.zeros(1, 1, 48, 80, dtype=torch.uint8)
    edge[..., :44] = 255
    assert mask_weights(edge, (6, 10), 0.0)[0, 0, 0].tolist() == [1, 1, 1, 1, 1, 0.5, 0, 0, 0, 0]


# -- the loss of a training step ----------------------------------------------------------------------------

def test_a_zero_mask_gives_zero_loss_and_moves_no_weight(data, tiny_model, tmp_path):
    from safetensors.torch import load_file

    before = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    zero = train(tmp_path / "zeros", **options(data, prior=False, **{
        "data.concepts[0].instance_set.mask_path": str(data / "zeros")}))
    assert zero.losses[0] == 0.0
    after = zero.unet_weights()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    # The same step with a mask of ones is the unmasked step exactly, and it does move the weights.
    ones = train(tmp_path / "ones", **options(data, prior=False, **{
        "data.concepts[0].instance_set.mask_path": str(data / "ones")}))
    plain = train(tmp_path / "plain", **options(data, prior=False, **{"masked_loss.enabled": False}))
    assert ones.losses[0] == plain.losses[0] > 0
    assert ones.losses[0] == pytest.approx(squared_error(ones.first).mean().item(), rel=1e-5)
    moved = ones.unet_weights()
    assert any(not torch.equal(moved[n], before[n]) for n in before)


@pytest.fixture(scope="module")
def half_run(data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("half"), **options(data))


def test_a_half_mask_loss_is_the_left_half_of_the_latent_mse(half_run):
    error = squared_error(half_run.first)  # [instance rows, then class rows, 4, 8, 8]
    half = len(error) // 2
    # The left half's squared error over every instance element, plus the class rows' plain MSE (no mask).
    instance = error[:half, :, :, :4].sum() / error[:half].numel()
    expected = (instance + error[half:].mean()).item()
    assert half_run.losses[0] == pytest.approx(expected, rel=1e-5)
    assert half_run.losses[0] != pytest.approx((error[:half].mean() + error[half:].mean()).item(), rel=1e-3)


def test_masks_compose_with_v_prediction_and_min_snr(data, alphas_cumprod, tmp_path):
    run = train(tmp_path, **options(data, **{"prediction_type": "v_prediction", "min_snr_gamma": 1.0,
                                             "masked_loss.unmasked_weight": 0.5}))
    first = run.first
    a = alphas_cumprod[first.timesteps].view(-1, 1, 1, 1)
    velocity = a.sqrt() * first.noise.double() - (1 - a).sqrt() * first.latents.double()
    snr = a.flatten() / (1 - a.flatten())
    snr_weights = torch.minimum(snr, torch.ones_like(snr)) / (snr + 1)
    half = len(velocity) // 2
    pixels = torch.ones(len(velocity), 1, 8, 8, dtype=torch.float64)
    pixels[:half, :, :, 4:] = 0.5  # the right half of each instance image weighs unmasked_weight
    per_row = (squared_error(first, velocity) * pixels).mean(dim=(1, 2, 3)) * snr_weights
    assert run.losses[0] == pytest.approx((per_row[:half].mean() + per_row[half:].mean()).item(), rel=1e-5)
    unmasked = squared_error(first, velocity).mean(dim=(1, 2, 3)) * snr_weights
    assert run.losses[0] != pytest.approx((unmasked[:half].mean() + unmasked[half:].mean()).item(), rel=1e-3)


def test_masks_with_cached_latents_give_the_loss_without_the_cache(data, half_run, tmp_path):
    run = train(tmp_path / "out", **options(data, **{"cache.latents": True, "cache.dir": str(tmp_path / "cache")}))
    assert list((tmp_path / "cache").glob("latents-*/*.safetensors"))  # the step read the cache
    assert torch.equal(run.first.timesteps, half_run.first.timesteps)
    assert run.losses[0] == pytest.approx(half_run.losses[0], rel=1e-4)
    error = squared_error(run.first)
    half = len(error) // 2
    expected = error[:half, :, :, :4].sum() / error[:half].numel() + error[half:].mean()
    assert run.losses[0] == pytest.approx(expected.item(), rel=1e-5)


# -- geometry -------------------------------------------------------------------------------------------------

def disc(size: tuple[int, int], centre: tuple[int, int], radius: int) -> Image.Image:
    """A white disc on black: an image that is its own mask."""
    image = Image.new("L", size, 0)
    x, y = centre
    ImageDraw.Draw(image).ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return image


def test_the_mask_follows_the_image_through_orientation_crop_rotation_and_flip(tmp_path, tiny_model):
    from transformers import CLIPTokenizer

    from engine.data.dataset import DreamBoothDataset
    from engine.data.index import scan_folder
    from engine.data.masks import find_masks

    picture = disc((120, 80), (40, 30), 22)
    picture.convert("RGB").save(tmp_path / "plain.png")
    picture.save(tmp_path / "plain.mask.png")
    # Stored on its side with EXIF orientation 6 (upright it is 120 x 80), the mask drawn over the stored
    # pixels and saved without an orientation.
    stored = disc((120, 80), (80, 50), 18).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.convert("RGB").save(tmp_path / "turned.png", exif=exif)
    stored.save(tmp_path / "turned.mask.png")

    records = scan_folder(str(tmp_path), "sks").records
    assert sorted(Path(r.path).name for r in records) == ["plain.png", "turned.png"]  # masks are no images
    assert [(r.width, r.height) for r in records] == [(120, 80), (120, 80)]
    masks = find_masks(records, str(tmp_path))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")

    def examples(center_crop: bool, augment: list) -> list[dict]:
        dataset = DreamBoothDataset(records, [0, 0], [(64, 48)], tokenizer, center_crop=center_crop, seed=3,
                                    augment=augment, masks=masks)
        messages = []
        with notices.collect(messages.append):
            found = [dataset[i]["instance"] for i in range(len(records))]
        assert messages == []  # no image or mask was unusable and replaced by another
        return found

    geometry = [AugmentStep(name="rotate", p=1.0, degrees=20.0), AugmentStep(name="hflip", p=1.0)]
    jitter = AugmentStep(name="color_jitter", p=1.0, brightness=0.4, contrast=0.0, saturation=0.0)
    augmented, jittered, plain = examples(False, geometry), examples(False, geometry + [jitter]), examples(True, [])
    for row, (example, coloured, reference) in enumerate(zip(augmented, jittered, plain)):
        luminance = ((example["pixel_values"][0] + 1) * 127.5).round()
        mask = example["mask"][0].double()
        assert example["mask"].shape == (1, 48, 64)
        # The image is its own mask: if the mask missed a step, it would not lie on the image.
        assert (luminance - mask).abs().max().item() <= 1, row
        assert (mask - reference["mask"][0].double()).abs().mean().item() > 10, row  # the steps moved it
        # Colour jitter (drawn after the geometry) changes the image but not its mask.
        assert torch.equal(coloured["mask"], example["mask"])
        assert not torch.equal(coloured["pixel_values"], example["pixel_values"])
    for example in plain:  # orientation and centre crop alone, no augmentation
        luminance = ((example["pixel_values"][0] + 1) * 127.5).round()
        assert (luminance - example["mask"][0].double()).abs().max().item() <= 1


def test_the_dataset_tab_tints_what_the_mask_leaves_out(tmp_path):
    from scal_gui.thumbnails import draw_crop

    Image.new("RGB", (200, 100), (128, 128, 128)).save(tmp_path / "grey.png")
    half_mask(200, 100).save(tmp_path / "grey.mask.png")
    thumb = Image.open(draw_crop(str(tmp_path / "grey.png"), (0, 0, 200, 100), tmp_path / "thumbs", side=200,
                                 mask=str(tmp_path / "grey.mask.png"))).convert("RGB")
    assert thumb.getpixel((50, 50)) == (128, 128, 128)  # white in the mask: as it is
    red, green, _ = thumb.getpixel((150, 50))
    assert red > 170 and green < 90


# -- finding masks ----------------------------------------------------------------------------------------------

def test_missing_masks_warn_once_with_the_count(tmp_path, tiny_model):
    from transformers import CLIPTokenizer

    from engine.data.prepare import prepare_data
    from engine.errors import UserError

    rng = np.random.default_rng(2)
    for name in ("a", "b", "c"):
        noise_image(rng, SIDE, SIDE).save(tmp_path / f"{name}.png")
    half_mask(SIDE, SIDE).save(tmp_path / "a.mask.png")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")

    def prepare(**values):
        config = cfg.from_dict({"model": "m", "prior_preservation": {"enabled": False}, "data": {
            "resolution": SIDE, "concepts": [{"instance_set": {"path": str(tmp_path), "prompt": "sks", **values}}]},
            "masked_loss": {"enabled": True}})
        messages = []
        with notices.collect(messages.append):
            prepared = prepare_data(config, tokenizer, seed=0)
        return prepared, messages

    prepared, messages = prepare()
    assert prepared.images == 3  # a.mask.png is not a training image
    assert messages == ["2 of 3 images have no mask; they train unmasked"]
    masked = [i for i, record in enumerate(prepared.dataset.instances) if record.path.endswith("a.png")]
    assert prepared.dataset[masked[0]]["instance"]["mask"].float().mean().item() == pytest.approx(127.5)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UserError, match=r"^config key 'masked_loss\.enabled': none of the 3 training images"):
        prepare(mask_path=str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=r"^config key 'data\.concepts\[0\]\.instance_set\.mask_path': folder not"):
        prepare(mask_path=str(tmp_path / "missing"))


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_an_unmasked_weight_outside_0_to_1_is_refused(tmp_path, weight):
    from engine.testing import tiny_config

    with pytest.raises(cfg.ConfigError, match=r"^config key 'masked_loss\.unmasked_weight': must be within \[0, 1\]"):
        cfg.from_dict(tiny_config(tmp_path, **{"masked_loss.unmasked_weight": weight}))


def test_masks_travel_in_shards_and_train_as_the_folder_does(data, half_run, tmp_path):
    from engine.data.make_shards import make_shards
    from engine.data.shards import shard_index

    shards = make_shards(str(data / "images"), str(tmp_path / "shards"), per_shard=3, say=lambda message: None)
    samples = [sample for shard in shards for sample in shard_index(shard)["samples"]]
    assert [s["member"] for s in samples] == [f"img_{i}.png" for i in range(4)]
    assert [s["mask"]["member"] for s in samples] == [f"img_{i}.mask.png" for i in range(4)]
    run = train(tmp_path / "run", **options(data, **{
        "data.concepts[0].instance_set.path": str(tmp_path / "shards")}))
    # The same masked loss as from the folder: a shard without its masks would train unmasked.
    assert run.losses == half_run.losses
    weights, expected = run.unet_weights(), half_run.unet_weights()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    # A mask folder names masks by the members' image names.
    zero = train(tmp_path / "zeros", **options(data, prior=False, **{
        "data.concepts[0].instance_set.path": str(tmp_path / "shards"),
        "data.concepts[0].instance_set.mask_path": str(data / "zeros")}))
    assert zero.losses[0] == 0.0


def one_step(output_dir: Path, **overrides) -> tuple[list, dict]:
    """The tiny preset trained for one step with sampling off: its losses and its checkpoint's denoiser."""
    import json

    from safetensors.torch import load_file

    from engine import checkpoints, events
    from engine.testing import tiny_config
    from engine.train import Trainer

    values = tiny_config(output_dir, **{"trainer.max_steps": 1, "sampling.interval_steps": 0, **overrides})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished) and result.step == 1, result
    run_dir = Path(result.run_dir)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    newest = checkpoints.latest_checkpoint(run_dir)
    return losses, load_file(newest / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("model", ["demo:tiny-flux", "demo:tiny-chroma", "demo:tiny-z-image", "demo:tiny-qwen-image",
                                   "demo:tiny-flux2-klein"])
def test_a_flow_familys_zero_mask_gives_zero_loss_and_a_mask_of_ones_the_unmasked_loss(model, data, tmp_path):
    from safetensors.torch import load_file

    from engine import paths

    flow = {"model": model, "prior_preservation.enabled": False}
    zero, after = one_step(tmp_path / "zeros", **options(data, **flow, **{
        "data.concepts[0].instance_set.mask_path": str(data / "zeros")}))
    assert zero == [0.0]
    before = load_file(paths.demo_model_dir(model.removeprefix("demo:tiny-")) / "transformer"
                       / "diffusion_pytorch_model.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    ones, moved = one_step(tmp_path / "ones", **options(data, **flow, **{
        "data.concepts[0].instance_set.mask_path": str(data / "ones")}))
    plain, _ = one_step(tmp_path / "plain", **options(data, **flow, **{"masked_loss.enabled": False}))
    assert ones[0] == pytest.approx(plain[0], rel=1e-6) and plain[0] > 0
    assert any(not torch.equal(moved[n], before[n]) for n in before)
