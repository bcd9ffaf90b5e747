"""Samples and class images: CLIP skip through the engine's encoder, and sampling that never ends a run."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from engine import checkpoints, events
from engine import config as cfg
from engine.testing import tiny_config
from engine.train import Trainer


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def tiny_pipeline(tiny_model):
    from engine.models.sd import StableDiffusion, load_components

    components = load_components(str(tiny_model))
    pipeline = StableDiffusion().pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    return components, pipeline


def test_clip_skip_samples_differ_and_equal_the_pipeline_fed_the_engines_embeddings(tiny_model, tmp_path):
    from engine.models.sd import StableDiffusion, encode_prompt
    from engine.sampling import PromptEncoder, generate_samples

    components, pipeline = tiny_pipeline(tiny_model)
    rendered = {}
    for skip in (1, 2):
        config = cfg.load(base=tiny_config(tmp_path, clip_stop_at_layer=skip))
        encoder = PromptEncoder(StableDiffusion(), components.tokenizer, components.text_encoder, skip)
        (path, _) = generate_samples(config, pipeline, encoder, tmp_path / f"skip{skip}")
        rendered[skip] = pixels(path)
    assert np.abs(rendered[1] - rendered[2]).max() > 0  # the skipped layer changes the picture

    # The same concept rendered by diffusers' pipeline from embeddings computed here by hand:
    # hidden_states[-2] through the final layer norm.
    concept = cfg.load(base=tiny_config(tmp_path)).sampling.concepts[0]
    def embed(text):
        ids = components.tokenizer([text], padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
        hidden = components.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        assert not torch.equal(hidden, encode_prompt(components.text_encoder, ids, 1))
        return components.text_encoder.final_layer_norm(hidden)
    with torch.no_grad():
        image = pipeline(prompt_embeds=embed(concept.prompt), negative_prompt_embeds=embed(concept.negative_prompt),
                         num_inference_steps=concept.steps, guidance_scale=concept.cfg_scale, width=concept.width,
                         height=concept.height, generator=torch.Generator().manual_seed(concept.seed)).images[0]
    assert np.array_equal(np.asarray(image, dtype=np.int16), rendered[2])


def seed_format_config(tmp_path, **overrides):
    """The earlier trainer's template shape: CLIP skip 2 and sampling every few steps."""
    return tiny_config(tmp_path, **{"clip_stop_at_layer": 2, "trainer.max_steps": 3, "sampling.interval_steps": 2,
                                    "checkpoint.every_n_train_steps": 2,
                                    "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})


def test_a_clip_skip_run_trains_to_its_end_and_writes_samples(tmp_path, class_images):
    config = tmp_path / "seed.yaml"
    config.write_text(cfg.dump_yaml(cfg.from_dict(seed_format_config(tmp_path / "out"))), encoding="utf-8")
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "out" / "tiny-demo").iterdir()
    # rounds at step 2 (the interval) and at the end (step 3), two images each
    assert sorted(p.parent.name for p in (run_dir / "samples").rglob("*.png")) == ["000002"] * 2 + ["000003"] * 2
    assert checkpoints.read_meta(checkpoints.latest_checkpoint(run_dir))["step"] == 3


def test_class_generation_with_clip_skip_renders_through_the_engines_encoder(tiny_model, sample_data, tmp_path):
    from engine.classgen import ClassGenJob

    written = {}
    for skip in (1, 2):
        values = tiny_config(tmp_path, clip_stop_at_layer=skip, **{
            "data.concepts[0].class_set.path": str(tmp_path / f"class{skip}"),
            "data.concepts[0].class_set.auto_generate.num_target": 2})
        result = ClassGenJob(cfg.from_dict(values)).run()
        assert isinstance(result, events.Finished) and result.summary["generated"] == 2, result
        written[skip] = [pixels(p) for p in sorted((tmp_path / f"class{skip}").rglob("*.png"))]
    assert len(written[2]) == 2
    assert all(np.abs(a - b).max() > 0 for a, b in zip(written[1], written[2]))


def test_a_failing_sample_round_is_reported_and_training_goes_on(tmp_path, class_images, monkeypatch):
    from engine import train

    rounds = []

    def out_of_memory(config, pipeline, encoder, out_dir, autocast_dtype=None):
        rounds.append(out_dir.name)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "generate_samples", out_of_memory)
    seen = []
    trainer = Trainer(cfg.from_dict(seed_format_config(tmp_path, **{"trainer.max_steps": 5})), on_event=seen.append)
    result = trainer.run()
    assert isinstance(result, events.Finished) and result.step == 5, result
    assert rounds == ["000002", "000004", "000005"]
    assert result.summary["failed_sample_rounds"] == 3
    warnings = [e.message for e in seen if isinstance(e, events.Log) and e.level == "warning"]
    assert sum("sampling at step 2 failed" in w and "Tried to allocate 2.00 GiB" in w for w in warnings) == 1
    steps = [json.loads(line)["step"] for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_a_failing_logger_is_a_warning(tmp_path, class_images, monkeypatch):
    from engine import loggers

    def refuse(self, record):
        raise ConnectionError("wandb: network unreachable")

    monkeypatch.setattr(loggers.ExternalLoggers, "log", refuse)
    seen = []
    result = Trainer(cfg.from_dict(seed_format_config(tmp_path, **{"sampling.interval_steps": 0})),
                     on_event=seen.append).run()
    assert isinstance(result, events.Finished) and result.step == 3, result
    assert sum("logging failed" in e.message for e in seen if isinstance(e, events.Log)) == 3


def test_an_error_that_ends_a_run_names_the_last_good_checkpoint(tmp_path, class_images, monkeypatch):
    from engine import train

    real = train.compute_loss
    calls = []

    def fails_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", fails_at_step_three)
    trainer = Trainer(cfg.from_dict(seed_format_config(tmp_path, **{"sampling.interval_steps": 0,
                                                                    "trainer.max_steps": 4})))
    result = trainer.run()
    assert isinstance(result, events.Failed)
    first_line = result.error.splitlines()[0]
    assert first_line == (f"RuntimeError: device lost (last good checkpoint: "
                          f"{trainer.run_dir / 'checkpoints' / 'step-00000002'}; continue with --resume "
                          f"{trainer.run_dir})")


@pytest.mark.parametrize("key,value", [
    ("sampling.concepts[0].width", 60), ("sampling.concepts[0].height", 0), ("sampling.concepts[0].steps", 0),
    ("data.concepts[0].class_set.auto_generate.steps", 0),
    ("data.concepts[0].class_set.auto_generate.batch_size", 0),
    ("data.concepts[0].class_set.auto_generate.num_target", -1)])
def test_values_a_sample_or_class_image_would_reject_are_refused_at_load(tmp_path, key, value):
    with pytest.raises(cfg.ConfigError, match=re.escape(f"config key '{key}'")):
        cfg.from_dict(tiny_config(tmp_path, **{key: value}))
