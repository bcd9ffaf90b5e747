"""The Qwen-Image-Edit family on its tiny stand-in: (control, target) pairs found beside the targets and in
instance_set.control_path, a target without its control refused, prompts read with the control as
QwenImageEditPlusPipeline reads them, the control's latents in the transformer's sequence as the pipeline puts them,
samples edited from a control image equal to the pipeline's, a LoRA run that learns, the memory estimate of a step on
pairs against what training allocates, and the refusals."""
import json
import re

import numpy as np
import pytest
import torch

from engine import config as cfg
from engine import events, paths
from engine.errors import UserError
from engine.models.tiny import REAL_CONFIGS
from engine.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "qwen-image-edit"
# (target size, control size): the second pair's control is a larger copy, cropped to its target's bucket
PAIRS = (((64, 64), (64, 64)), ((64, 64), (96, 96)), ((96, 64), (96, 64)), ((64, 64), (64, 64)))


@pytest.fixture(scope="module")
def tiny_edit(demo_cache):
    return paths.demo_model_dir(ARCH)


@pytest.fixture(scope="module")
def loaded(tiny_edit):
    from engine.models.family import family_for

    config = _config(tiny_edit)
    family = family_for(config)
    return config, family, family.load(config)


def _config(model, **values):
    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, **values})


def _picture(size, colour, disc):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (230, 230, 210))
    radius = min(size) // 3
    ImageDraw.Draw(image).ellipse((size[0] // 2 - radius, size[1] // 2 - radius, size[0] // 2 + radius,
                                   size[1] // 2 + radius), fill=colour if disc else (230, 230, 210))
    return image


def _pairs(folder, beside=True, second=False):
    """Targets (a blue disc) and their controls (the same disc in red) with the edit as caption; the controls
    beside the targets (`<stem>.control.png`, with `second` also a `<stem>.control2.png` without the disc) or,
    with beside false, in folder/controls."""
    folder.mkdir(parents=True, exist_ok=True)
    controls = folder if beside else folder / "controls"
    controls.mkdir(exist_ok=True)
    for index, (target, control) in enumerate(PAIRS):
        _picture(target, (40, 80, 220), True).save(folder / f"pair_{index}.png")
        (folder / f"pair_{index}.txt").write_text("make the disc blue", encoding="utf-8")
        _picture(control, (220, 40, 40), True).save(controls / (f"pair_{index}.control.png" if beside
                                                                else f"pair_{index}.png"))
        if second:
            _picture(control, (220, 40, 40), False).save(folder / f"pair_{index}.control2.png")
    return folder


def _reference(tiny_edit):
    """QwenImageEditPlusPipeline as diffusers loads the tiny folder, its processor made without the video
    processor (which needs torchvision)."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import AutoImageProcessor, Qwen2Tokenizer, Qwen2VLProcessor

    from engine.captioning.models import images_only

    processor = images_only(Qwen2VLProcessor)(
        image_processor=AutoImageProcessor.from_pretrained(tiny_edit / "processor"),
        tokenizer=Qwen2Tokenizer.from_pretrained(tiny_edit / "processor"))
    pipeline = QwenImageEditPlusPipeline.from_pretrained(tiny_edit, processor=processor)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _condition(pipeline, image):
    """The control as QwenImageEditPlusPipeline resizes it for Qwen2.5-VL's vision tower."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
    return pipeline.image_processor.resize(image, height, width)


def test_the_shipped_configs_are_the_edit_pipelines_with_qwen_images_models():
    index = json.loads((REAL_CONFIGS / ARCH / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    for component, file in (("transformer", "config.json"), ("text_encoder", "config.json"), ("vae", "config.json"),
                            ("scheduler", "scheduler_config.json")):
        # Qwen-Image-Edit-2509 is Qwen-Image's transformer fine-tuned; encoder, autoencoder and schedule are its own
        assert (json.loads((REAL_CONFIGS / ARCH / component / file).read_text())
                == json.loads((REAL_CONFIGS / "qwen-image" / component / file).read_text()))
    processor = json.loads((REAL_CONFIGS / ARCH / "processor" / "preprocessor_config.json").read_text())
    assert (processor["patch_size"], processor["merge_size"], processor["temporal_patch_size"],
            processor["min_pixels"], processor["max_pixels"]) == (14, 2, 2, 56 * 56, 28 * 28 * 16384)


def test_pairs_are_found_beside_their_targets_and_in_control_path(loaded, tmp_path):
    from engine.data.dataset import crop_to_size, load_image, to_tensor
    from engine.data.prepare import prepare_data

    config, _, components = loaded
    for beside, second in ((True, False), (False, False), (True, True)):
        folder = _pairs(tmp_path / f"beside-{beside}-{second}", beside, second)
        instance = {"path": str(folder), "prompt": "{TXT_PROMPT}"}
        if not beside:
            instance["control_path"] = str(folder / "controls")
        run = _config(config.model, data={"resolution": 64, "center_crop": True,
                                          "concepts": [{"instance_set": instance}]}, num_workers=0, batch_size=2)
        data = prepare_data(run, components.tokenizer, seed=0)
        assert len(data.dataset) == len(PAIRS)  # control files are never training images
        for index in range(len(PAIRS)):
            example = data.dataset[index]["instance"]
            stem = example["path"].rpartition("/")[2][:-4]
            files = ([folder / f"{stem}.control.png"] + [folder / f"{stem}.control2.png"] * second if beside
                     else [folder / "controls" / f"{stem}.png"])
            height, width = example["pixel_values"].shape[1:]
            # each cropped to its target's bucket, centred as the target is (data.center_crop)
            assert torch.equal(example["control_pixel_values"], torch.stack(
                [to_tensor(crop_to_size(load_image(str(file)), width, height, True, None)) for file in files]))
        batch = next(iter(data.loader))
        rows, *image = batch["pixel_values"].shape
        assert batch["control_pixel_values"].shape == (rows, 1 + second, *image)


def test_a_target_without_its_control_is_refused_in_one_line(loaded, tmp_path):
    from engine.data.prepare import prepare_data

    config, _, components = loaded
    folder = _pairs(tmp_path / "pairs")
    (folder / "pair_2.control.png").unlink()
    run = _config(config.model, data={"resolution": 64, "concepts": [{"instance_set": {"path": str(folder)}}]})
    with pytest.raises(UserError) as error:
        prepare_data(run, components.tokenizer, seed=0)
    message = str(error.value)
    assert "\n" not in message and "data.concepts[0].instance_set.control_path" in message
    assert str(folder / "pair_2.png") in message
    _picture((64, 64), (0, 0, 0), False).save(folder / "pair_2.control.png")
    _picture((64, 64), (0, 0, 0), False).save(folder / "pair_1.control2.png")
    with pytest.raises(UserError, match="pair_1.png has 2 control images but .*pair_0.png has 1"):
        prepare_data(run, components.tokenizer, seed=0)


def test_control_images_are_refused_for_a_model_that_does_not_edit(tmp_path):
    from engine.models.family import family_for

    model = tmp_path / "qwen-image"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    for values, key in (
            ({"data": {"concepts": [{"instance_set": {"path": str(tmp_path), "control_path": str(tmp_path)}}]}},
             "data.concepts[0].instance_set.control_path"),
            ({"sampling": {"concepts": [{"prompt": "x", "control_image": str(tmp_path / "a.png")}]}},
             "sampling.concepts[0].control_image")):
        with pytest.raises(UserError, match="^" + re.escape(f"config key '{key}'")):
            family_for(_config(model, **values))


def test_prompts_are_read_with_the_control_as_the_pipelines_encode_prompt_reads_them(loaded, tiny_edit):
    from engine.data.dataset import Collate, to_tensor, tokenize

    config, family, components = loaded
    pipeline = _reference(tiny_edit)
    tokenizer = components.tokenizer
    prompts = ["make the disc blue", "", "café naïve 日本語 " + " ".join(f"word{i}" for i in range(40))]
    controls = [_picture((80, 48), (220, 40, 40), True), _picture((80, 48), (40, 170, 70), False)]
    collate = Collate(tokenizer.pad_token_id, tokenizer.model_max_length, pad_to_max=False)
    ids = collate([{"instance": {"input_ids": tokenize(tokenizer, prompt), "pixel_values": torch.zeros(1),
                                 "caption": prompt, "path": "", "sample_key": 0, "time_ids": [0] * 6}}
                   for prompt in prompts])["input_ids"]
    with torch.no_grad():
        both = torch.stack([to_tensor(control) for control in controls])
        ours = family.encode_text(components.text_encoder, ids, config.clip_stop_at_layer,
                                  controls=both.expand(len(prompts), -1, -1, -1, -1))
        for row, prompt in enumerate(prompts):
            theirs, _ = pipeline.encode_prompt(prompt, image=[_condition(pipeline, c) for c in controls],
                                               device="cpu")
            length = theirs.shape[1]
            mask = ours["encoder_hidden_states_mask"][row, :, 0]
            assert mask.tolist() == [1] * length + [0] * (len(mask) - length), prompt
            torch.testing.assert_close(ours["encoder_hidden_states"][row, :length], theirs[0], atol=1e-6, rtol=0)
            assert not ours["encoder_hidden_states"][row, length:].any()
        # one control alone: the pipeline's single picture
        alone = family.encode_text(components.text_encoder, ids[:1], 1, controls=both[None, :1])
        theirs, _ = pipeline.encode_prompt(prompts[0], image=[_condition(pipeline, controls[0])], device="cpu")
    assert alone["encoder_hidden_states_mask"][0, :, 0].sum() == theirs.shape[1]
    torch.testing.assert_close(alone["encoder_hidden_states"][0, :theirs.shape[1]], theirs[0], atol=1e-6, rtol=0)


def test_the_control_latents_reach_the_transformer_as_the_pipeline_builds_them(loaded, tiny_edit, monkeypatch):
    """The packed sequence (target, then control), img_shapes and prediction the family gives the transformer
    are those of QwenImageEditPlusPipeline for the same control image, latents, size and embeddings."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from engine.data.dataset import to_tensor
    from engine.step import control_latents

    _, family, components = loaded
    controls = [_picture((64, 64), (220, 40, 40), True), _picture((64, 64), (40, 170, 70), False)]
    # the pipeline resizes its input to about VAE_IMAGE_SIZE pixels for the autoencoder; training uses the crop
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)
    pipeline = _reference(tiny_edit)
    embeds = torch.randn(1, 5, 16)
    latents = torch.randn(1, 16, 6, 10)
    calls = []

    def capture(transformer):
        forward = transformer.forward

        def recording(*args, **kwargs):
            output = forward(*args, **kwargs)
            calls.append({**kwargs, "output": output[0]})
            return output
        return recording

    monkeypatch.setattr(pipeline.transformer, "forward", capture(pipeline.transformer))
    pipeline(image=controls, prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
             latents=plus.QwenImageEditPlusPipeline._pack_latents(latents, 1, 16, 6, 10), height=48, width=80,
             num_inference_steps=2, output_type="latent")
    theirs = calls[0]  # the first step's: its input is the given latents
    monkeypatch.setattr(components.unet, "forward", capture(components.unet))
    with torch.no_grad():
        pixels = torch.stack([to_tensor(control) for control in controls])[None]
        encoded = control_latents(components.vae, {"control_pixel_values": pixels}, torch.device("cpu"),
                                  family.normalized_latents)
        prediction = family.predict(components.unet, latents, theirs["timestep"] * 1000,
                                    {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": torch.ones(1, 5, 1),
                                     "control_latents": encoded}, None)
    ours = calls[-1]
    assert ours["img_shapes"] == theirs["img_shapes"] == [[(1, 3, 5), (1, 4, 4), (1, 4, 4)]]
    assert ours["hidden_states"].shape == (1, 15 + 2 * 16, 64)
    torch.testing.assert_close(ours["hidden_states"], theirs["hidden_states"], atol=1e-5, rtol=0)
    assert torch.equal(ours["hidden_states"][:, :15], theirs["hidden_states"][:, :15])
    unpacked = plus.QwenImageEditPlusPipeline._unpack_latents(theirs["output"][:, :15], 48, 80, 8)[:, :, 0]
    torch.testing.assert_close(prediction, unpacked, atol=1e-5, rtol=0)


def test_a_sample_edited_from_a_held_out_control_is_the_pipelines_image(loaded, tiny_edit, tmp_path, monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus
    from PIL import Image

    from engine.sampling import PromptEncoder, generate_samples

    config, family, components = loaded
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)  # a cheap autoencoder pass for both
    _picture((64, 64), (220, 40, 40), True).save(tmp_path / "held-out.png")
    run = _config(config.model, sampling={"concepts": [
        {"prompt": "make the disc blue", "negative_prompt": "blurry", "control_image": str(tmp_path / "held-out.png"),
         "steps": 2, "cfg_scale": 2.5, "seed": 3, "width": 64, "height": 48}]})
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    written = generate_samples(run, pipeline, encoder, tmp_path / "samples")
    ours = np.asarray(Image.open(written[0]), dtype=np.int16)
    theirs = _reference(tiny_edit)(image=Image.open(tmp_path / "held-out.png"), prompt="make the disc blue",
                                   negative_prompt="blurry", true_cfg_scale=2.5, num_inference_steps=2, width=64,
                                   height=48, generator=torch.Generator().manual_seed(3)).images[0]
    assert ours.shape == (48, 64, 3)
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("values, key", [
    ({"cache": {"text_embeddings": True}}, "cache.text_embeddings"),
    ({"augment": [{"name": "hflip"}]}, "augment"),
    ({"prior_preservation": {"enabled": True}, "data": {"concepts": [
        {"instance_set": {"path": "pairs"}, "class_set": {"path": "class"}}]}}, "data.concepts[0].class_set"),
    ({"sampling": {"concepts": [{"prompt": "make it blue"}]}}, "sampling.concepts[0].control_image"),
    ({"sampling": {"concepts": [{"prompt": "x", "control_image": "/nonexistent.png"}]}},
     "sampling.concepts[0].control_image"),
])
def test_what_qwen_image_edit_cannot_train_with_is_refused_naming_the_key(tiny_edit, values, key):
    from engine.models.qwen_image_edit import check_config

    with pytest.raises(UserError, match="^" + re.escape(f"config key '{key}'")):
        check_config(_config(tiny_edit, **values))


@pytest.mark.parametrize("cached", [False, True], ids=["encoded", "cached-latents"])
def test_the_memory_estimate_is_what_a_lora_step_on_pairs_allocates(tmp_path, cached, monkeypatch):
    """The estimate traces the step with the vision tower reading a control image and the control's latents in the
    transformer's sequence: within 2 % of what training on pairs allocates, its text encoder's outputs computed
    without gradients each step; without the control's tokens it would be lower."""
    import gc

    import engine.train
    from engine import vram
    from engine.models.adapters import add_adapter
    from engine.models.family import family_for
    from engine.plan import make_plan
    from engine.setup import frozen_models, trained_parts
    from test_vram import measure_training, model_bytes

    folder = _pairs(tmp_path / "pairs")
    config = cfg.from_dict(tiny_config(tmp_path / "out", **{
        "model": f"demo:tiny-{ARCH}", "prior_preservation.enabled": False, "batch_size": 2,
        # a caption that fills the prompt: on a CPU the attention over a padded one falls back to a kernel that
        # holds every query's weights over every key, which the GPU's kernels (and so the estimate) never hold
        "data.concepts": [{"instance_set": {"path": str(folder), "prompt": "blue " * 1100}}],
        "data.resolution": 64, "data.center_crop": True, "cache.latents": cached, "network.type": "lora",
        "network.rank": 4, "network.alpha": 4.0, "trainer.max_steps": 2, "sampling.interval_steps": 0,
        "sampling.concepts": [{"prompt": "x", "control_image": str(folder / "pair_0.control.png")}],
        "checkpoint.every_n_train_steps": 100}))
    estimated = vram.estimate(config)
    # The collector runs before each micro-batch and never during one: the peak measured here moves by 4 % with
    # the moment Python's collector happens to run inside the step, which the tests run before this one decide.
    compute_loss = engine.train.compute_loss

    def collected_first(*args, **kwargs):
        gc.collect()
        return compute_loss(*args, **kwargs)

    monkeypatch.setattr(engine.train, "compute_loss", collected_first)
    gc.disable()
    try:
        measured = measure_training(config)
    finally:
        gc.enable()
    assert estimated.peak == pytest.approx(measured.peak, rel=0.02)
    # the weights on the device: the adapted transformer, Qwen2.5-VL with its vision tower, the autoencoder
    plan = make_plan(config, "cpu")
    components = family_for(config).load(config)
    trained = trained_parts(components, plan)
    for name, model in trained.items():
        add_adapter(model, name, config.network, 0)
    assert estimated.parameters * vram.GIB == model_bytes(*trained.values(), *frozen_models(components, plan))


def test_control_latents_are_cached_with_their_targets(loaded, tmp_path):
    from engine.data.cache import cache_latents
    from engine.data.prepare import prepare_data

    config, _, components = loaded
    folder = _pairs(tmp_path / "pairs", second=True)
    run = _config(config.model, num_workers=0, data={"resolution": 64, "center_crop": True, "concepts": [
        {"instance_set": {"path": str(folder), "prompt": "make the disc blue"}}]})
    data = prepare_data(run, components.tokenizer, seed=0)
    uncached = data.dataset[1]["instance"]
    logged = []
    data.dataset.latents = cache_latents(data.dataset, components.vae, torch.device("cpu"), tmp_path / "cache",
                                         logged.append)
    assert f"encoding {3 * len(PAIRS)}" in logged[0]  # each target and its two controls
    cached = data.dataset[1]["instance"]
    with torch.no_grad():
        want = components.vae.encode(uncached["control_pixel_values"]).latent_dist.parameters
    torch.testing.assert_close(cached["control_latent_params"], want, atol=1e-5, rtol=0)
    assert torch.equal(cached["control_pixel_values"], uncached["control_pixel_values"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, demo_cache):
    from engine.train import Trainer

    folder = tmp_path_factory.mktemp("edit-pairs")
    _pairs(folder)
    values = tiny_config(tmp_path_factory.mktemp("edit-lora"), **{
        "model": f"demo:tiny-{ARCH}", "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": str(folder), "prompt": "{TXT_PROMPT}"}}],
        "network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "optimizer.params.lr": 1e-2,
        "optimizer.lr_scheduler.warmup.enabled": False, "trainer.max_steps": 12,
        "checkpoint.every_n_train_steps": 12, "validation.every_n_steps": 4, "validation.path": str(folder),
        "validation.prompt": "{TXT_PROMPT}", "sampling.interval_steps": 12,
        "sampling.concepts": [{"prompt": "make the disc blue", "control_image": str(folder / "pair_0.control.png"),
                               "steps": 2, "cfg_scale": 1.0, "num_samples": 1, "width": 64, "height": 64}]})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer.run_dir, [m["val_loss"] for m in metrics if "val_loss" in m]


def test_a_lora_on_pairs_lowers_the_loss_and_samples_edit_the_named_control(lora_run, tiny_edit):
    from safetensors import safe_open

    from engine import checkpoints
    from test_adapter_convert import library_messages

    run_dir, validation = lora_run
    assert len(validation) == 3 and validation[-1] < validation[0] - 0.02, validation
    assert len(list((run_dir / "samples").rglob("*.png"))) == 1
    # the adapter file is Qwen-Image's, which the edit pipeline loads whole
    adapter = checkpoints.latest_checkpoint(run_dir) / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "qwen_image"
    pipeline = _reference(tiny_edit)
    with library_messages() as messages:
        pipeline.load_lora_weights(str(adapter))
    assert messages == []
