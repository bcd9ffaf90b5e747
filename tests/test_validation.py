"""Validation loss: fixed noise and timesteps, plain MSE, no effect on training, seeded splits."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoints, events
from engine import config as cfg
from engine.testing import tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def copy_images(source, target, count):
    """The first `count` images of a demo folder, with their captions when they have some."""
    target.mkdir(parents=True)
    for image in sorted(source.glob("*.png"))[:count]:
        shutil.copy(image, target)
        caption = image.with_suffix(".txt")
        if caption.is_file():
            shutil.copy(caption, target)
    return target


def finetune_values(tmp_path, **overrides):
    return tiny_config(tmp_path, **{"prior_preservation.enabled": False, "sampling.interval_steps": 0,
                                    "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance",
                                                                        "prompt": "sks toy"}}],
                                    **overrides})


def drawn_samples(vae, folder, seed: int):
    """(image, latent sample, noise) of each held-out image in folder, drawn as validation draws them: from
    the image's own generator, the sample first (step.RowNoise's order)."""
    from engine.data.dataset import crop_to_size, load_image, to_tensor
    from engine.validation import noise_key

    for index, image in enumerate(sorted(folder.glob("*.png"))):
        pixels = to_tensor(crop_to_size(load_image(str(image)), 64, 64, True, None))[None]
        distribution = vae.encode(pixels).latent_dist
        generator = torch.Generator().manual_seed(noise_key(seed, index))
        eps = torch.randn(distribution.mean.shape[1:], generator=generator)
        sample = distribution.mean + distribution.std * eps
        yield image, sample, torch.randn(sample.shape[1:], generator=generator)[None]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_val_loss_of_an_untrained_model_is_the_plain_loss_computed_by_hand(tmp_path, sample_data, prediction_type):
    from engine.models.family import family_for
    from engine.step import StepModels
    from engine.validation import build_validation_set, validation_loss

    folder = copy_images(sample_data / "finetune", tmp_path / "held-out", 3)
    timesteps = [50, 950]
    # min-SNR weights and a noise offset shape the training loss only: validation stays the plain MSE
    config = cfg.from_dict(finetune_values(tmp_path, **{
        "prediction_type": prediction_type, "noise_offset": 0.1, "min_snr_gamma": 5.0,
        "validation": {"every_n_steps": 10, "path": str(folder), "timesteps": timesteps, "seed": 3}}))
    family = family_for(config)
    components = family.load(config)
    unet, vae, encoder = components.unet, components.vae, components.text_encoder
    scheduler, tokenizer = components.noise_scheduler, components.tokenizer
    assert scheduler.config.prediction_type == prediction_type
    validation = build_validation_set(config, tokenizer, scheduler, [], [(64, 64)])
    assert len(validation) == 3 and validation.batches == [[0, 1], [2]]  # batch_size 2
    models = StepModels(family=family, unet=unet, text_encoder=encoder, vae=vae,
                        objective=family.objective(config, scheduler))
    per_timestep = validation_loss(config, models, validation, torch.device("cpu"), None)

    hand = {t: [] for t in timesteps}
    with torch.no_grad():
        for image, sample, noise in drawn_samples(vae, folder, 3):
            latents = sample * vae.config.scaling_factor
            caption = image.with_suffix(".txt").read_text()
            ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
            hidden = encoder(ids).last_hidden_state
            for t in timesteps:
                step = torch.tensor([t])
                prediction = unet(scheduler.add_noise(latents, noise, step), step, hidden).sample
                target = scheduler.get_velocity(latents, noise, step) if prediction_type == "v_prediction" else noise
                hand[t].append(((prediction - target) ** 2).mean().item())
    expected = {t: sum(values) / len(values) for t, values in hand.items()}
    assert per_timestep == pytest.approx(expected, rel=1e-5)
    assert expected[50] != pytest.approx(expected[950], rel=1e-3)  # the timesteps were used, not drawn


def test_a_flow_models_val_loss_is_the_unweighted_flow_loss_at_fixed_sigmas(tmp_path, sample_data):
    """Flux.1: validation timesteps are σ × 1000; the loss weighting and the noise offset stay out of it."""
    from engine.models.family import family_for
    from engine.step import StepModels
    from engine.validation import build_validation_set, validation_loss

    folder = copy_images(sample_data / "finetune", tmp_path / "held-out", 2)
    timesteps = [100, 900]
    config = cfg.from_dict(finetune_values(tmp_path, **{
        "model": "demo:tiny-flux", "noise_offset": 0.1, "flow.weighting": "cosmap",
        "validation": {"every_n_steps": 10, "path": str(folder), "timesteps": timesteps, "seed": 3}}))
    family = family_for(config)
    components = family.load(config)
    transformer, vae, encoder = components.unet, components.vae, components.text_encoder
    scheduler, tokenizer = components.noise_scheduler, components.tokenizer
    validation = build_validation_set(config, tokenizer, scheduler, [], [(64, 64)])
    models = StepModels(family=family, unet=transformer, text_encoder=encoder, vae=vae,
                        objective=family.objective(config, scheduler))
    per_timestep = validation_loss(config, models, validation, torch.device("cpu"), None)

    hand = {t: [] for t in timesteps}
    with torch.no_grad():
        for image, sample, noise in drawn_samples(vae, folder, 3):
            latents = (sample - vae.config.shift_factor) * vae.config.scaling_factor
            ids = tokenizer(image.with_suffix(".txt").read_text(), padding="max_length",
                            max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            conditioning = family.encode_text(encoder, ids, 1)
            for t in timesteps:
                sigma = t / 1000
                noisy = (1 - sigma) * latents + sigma * noise
                prediction = family.predict(transformer, noisy, torch.tensor([float(t)]), conditioning, None)
                hand[t].append(((prediction - (noise - latents)) ** 2).mean().item())
    expected = {t: sum(values) / len(values) for t, values in hand.items()}
    assert per_timestep == pytest.approx(expected, rel=1e-5)
    assert expected[100] != pytest.approx(expected[900], rel=1e-3)


def final_tensors(run_dir):
    newest = checkpoints.latest_checkpoint(run_dir)
    tensors = {}
    for file in sorted(newest.rglob("*.safetensors")):
        tensors.update({f"{file.relative_to(newest)}:{k}": v for k, v in load_file(file).items()})
    return newest.name, tensors, checkpoints.load_state(newest)["rng"]


def test_runs_with_validation_repeat_its_figures_and_train_exactly_as_without_it(tmp_path, sample_data):
    from engine.train import Trainer

    held_out = copy_images(sample_data / "finetune", tmp_path / "held-out", 2)

    def run(name, every):
        # Adapter dropout draws from the global RNG in train mode: validation that drew from it, or left
        # a model in eval mode, would change every later step.
        values = finetune_values(tmp_path / name, **{
            "trainer.max_steps": 5, "checkpoint.every_n_train_steps": None, "checkpoint.every_n_epochs": None,
            "network": {"type": "lora", "rank": 4, "alpha": 4, "dropout": 0.3},
            "optimizer.params.lr": 5e-3,
            "validation": {"every_n_steps": every, "path": str(held_out), "prompt": "{TXT_PROMPT}"}})
        seen = []
        trainer = Trainer(cfg.from_dict(values), on_event=seen.append)
        assert isinstance(trainer.run(), events.Finished)
        metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        return metrics, [e for e in seen if isinstance(e, events.Validation)], final_tensors(trainer.run_dir)

    first, first_events, (first_name, first_weights, first_rng) = run("a", 2)
    second, second_events, _ = run("b", 2)
    off, off_events, (off_name, off_weights, off_rng) = run("off", 0)

    rounds = [m for m in first if "val_loss" in m]
    assert [m["step"] for m in rounds] == [2, 4, 5]  # every 2 steps and at the end
    for m in rounds:
        per_timestep = [m[f"val_loss_t{t}"] for t in (100, 300, 500, 700, 900)]
        assert m["val_loss"] == pytest.approx(sum(per_timestep) / 5)
    assert [(e.step, e.loss) for e in first_events] == [(m["step"], m["val_loss"]) for m in rounds]
    assert first_events[0].per_timestep.keys() == {"100", "300", "500", "700", "900"}
    assert [e.loss for e in second_events] == [e.loss for e in first_events]  # identical, not merely close
    assert first_events[0].loss != first_events[-1].loss  # it follows the weights

    assert not off_events and not any("val_loss" in m for m in off)
    assert [m["loss"] for m in off] == [m["loss"] for m in first]
    assert first_name == off_name == "step-00000005" and first_weights.keys() == off_weights.keys()
    assert all(torch.equal(first_weights[k], off_weights[k]) for k in first_weights)
    assert torch.equal(first_rng["torch"], off_rng["torch"])
    assert first_rng["python"] == off_rng["python"]


def test_a_failing_validation_round_is_a_warning_and_the_run_goes_on(tmp_path, sample_data, monkeypatch):
    import engine.train
    from engine.train import Trainer

    def fails(*args):
        raise RuntimeError("no room")

    monkeypatch.setattr(engine.train, "validation_loss", fails)
    held_out = copy_images(sample_data / "finetune", tmp_path / "held-out", 1)
    values = finetune_values(tmp_path, **{"trainer.max_steps": 2, "validation.every_n_steps": 1,
                                          "validation.path": str(held_out)})
    seen = []
    result = Trainer(cfg.from_dict(values), on_event=seen.append).run()
    assert isinstance(result, events.Finished) and result.step == 2
    warnings = [e.message for e in seen if isinstance(e, events.Log) and e.level == "warning"]
    assert warnings == [f"validation at step {s} failed and was skipped; training goes on: RuntimeError: no room"
                        for s in (1, 2)]


def test_a_validation_folder_without_captions_is_scored_with_the_prompt_left_empty(tmp_path, sample_data):
    from engine.train import Trainer

    held_out = tmp_path / "uncaptioned"
    held_out.mkdir()
    for image in sorted((sample_data / "finetune").glob("*.png"))[:2]:
        shutil.copy(image, held_out)

    def run(name, **validation):
        values = finetune_values(tmp_path / name, **{
            "trainer.max_steps": 1, "validation": {"every_n_steps": 1, "path": str(held_out), **validation}})
        seen = []
        result = Trainer(cfg.from_dict(values), on_event=seen.append).run()
        assert isinstance(result, events.Finished) and result.step == 1
        about_captions = [e.message for e in seen
                          if isinstance(e, events.Log) and e.level == "warning" and "caption" in e.message]
        (validation,) = [e for e in seen if isinstance(e, events.Validation)]
        return about_captions, validation

    warnings, scored = run("default")  # validation.prompt: {TXT_PROMPT}, the default
    assert warnings == [f"{held_out / name}.png: no caption file {name}.txt for {{TXT_PROMPT}}; using the prompt "
                        "without it" for name in ("shapes_000", "shapes_001")]
    assert scored.step == 1 and math.isfinite(scored.loss) and scored.loss > 0
    assert scored.per_timestep.keys() == {"100", "300", "500", "700", "900"}
    # Each image was scored with the empty prompt.
    _, empty = run("empty", prompt="")
    assert empty.loss == scored.loss and empty.per_timestep == scored.per_timestep


class Tokenizer:
    pad_token_id = 0
    model_max_length = 77

    def __call__(self, text, truncation=True, max_length=77):
        return type("Tokens", (), {"input_ids": [1, len(text), 2]})()


def split_of(tmp_path, sample_data, **validation):
    """The training and held-out images of a concept of 10 images beside one of 2."""
    from engine.data.prepare import prepare_data

    values = tiny_config(tmp_path, **{
        "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}},
                          {"instance_set": {"path": str(copy_images(sample_data / "finetune", tmp_path / "two", 2)),
                                            "prompt": "{TXT_PROMPT}"}}],
        "validation": {"every_n_steps": 5, **validation}})
    data = prepare_data(cfg.from_dict(values), Tokenizer(), seed=1)

    def name(record):  # folder and file, the same for every copy of the second concept
        return "/".join(record.path.split("/")[-2:])

    return {name(r) for r in data.dataset.instances}, [name(r) for r in data.held_out]


def test_a_split_holds_out_a_seeded_share_of_each_concept(tmp_path, sample_data):
    from engine.errors import UserError

    trained, held = split_of(tmp_path / "a", sample_data, split=0.3)
    instance = [p for p in held if p.startswith("instance/")]
    assert len(instance) == 3 and len(held) == 4  # 30% of 10 images, and 30% of 2 rounds to 1
    assert len(trained) == 8 and not trained & set(held)
    assert split_of(tmp_path / "b", sample_data, split=0.3)[1] == held  # the same seed holds out the same
    assert split_of(tmp_path / "c", sample_data, split=0.3, seed=9)[1] != held
    with pytest.raises(UserError, match=r"config key 'validation.split': 0.75 of the 2 images of data.concepts\[1\] "
                                        "leaves none to train on"):
        split_of(tmp_path / "d", sample_data, split=0.75)


@pytest.mark.parametrize("validation, message", [
    ({"every_n_steps": 5, "path": "x", "split": 0.1},
     "config keys 'validation.path' and 'validation.split': set one of them"),
    ({"split": 0.1}, "config key 'validation.split': holds images out of training for a validation that is off"),
    ({"every_n_steps": 5}, "config key 'validation.every_n_steps': validation needs images"),
    ({"every_n_steps": 5, "split": 1.0}, "config key 'validation.split': must be within [0, 1)"),
    ({"every_n_steps": -1}, "config key 'validation.every_n_steps': must be 0 (off) or more"),
    ({"every_n_steps": 5, "split": 0.1, "timesteps": []}, "config key 'validation.timesteps'"),
    ({"every_n_steps": 5, "split": 0.1, "timesteps": [100, 100]}, "config key 'validation.timesteps'"),
])
def test_validation_mistakes_name_the_key(validation, message):
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict({"prior_preservation": {"enabled": False}, "validation": validation})
    assert message in str(error.value)


def test_timesteps_past_the_schedule_are_refused(tmp_path, tiny_model):
    from engine.errors import UserError
    from engine.models.sd import load_components
    from engine.validation import build_validation_set

    config = cfg.from_dict(finetune_values(tmp_path, **{"validation": {"every_n_steps": 5, "path": "x",
                                                                       "timesteps": [500, 1000]}}))
    scheduler = load_components(str(tiny_model)).noise_scheduler
    with pytest.raises(UserError, match=r"config key 'validation.timesteps': the model's noise schedule has "
                                        r"timesteps 0 to 999, got \[1000\]"):
        build_validation_set(config, None, scheduler, [], [(64, 64)])


def test_the_app_and_the_loggers_show_val_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.loggers import ExternalLoggers
    from scal_gui import charts
    from scal_gui.jobs import History, JobManager

    event = events.Validation(step=4, loss=0.25, per_timestep={"100": 0.5, "900": 0.0})
    assert events.event_from_dict(json.loads(json.dumps(event.to_dict()))) == event  # as a child process relays it
    history = History(kind="train")
    JobManager()._apply(history, event)
    assert history.validation == [{"step": 4, "loss": 0.25}]
    frame = charts.loss_frame([{"step": s, "loss": 1.0, "lr": 0.1} for s in range(1, 6)], [{"step": 4, "loss": 0.25}])
    validation = frame[frame.series == "validation"]
    assert validation.step.tolist() == [4] and validation.loss.tolist() == [0.25]

    loggers = ExternalLoggers(cfg.from_dict({"prior_preservation": {"enabled": False},
                                             "loggers": {"tensorboard": {}}}), tmp_path, {})
    loggers.log({"step": 4, "loss": 1.0, "val_loss": 0.25, "val_loss_t100": 0.5})
    loggers.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert {"train/loss", "validation/loss", "validation/loss_t100"} <= set(accumulator.Tags()["scalars"])
    assert [e.value for e in accumulator.Scalars("validation/loss")] == [0.25]


def test_the_form_sets_repeats_and_validation():
    from scal_gui import fields

    by_key = {f.key: f for f in fields.ALL}
    specs = [by_key[key] for key in ("data.concepts[0].instance_set.repeats", "validation.every_n_steps",
                                     "validation.split", "validation.path")]
    raw = {"prior_preservation": {"enabled": False}, "data": {"concepts": [{"instance_set": {"path": "x"}}]}}
    config = cfg.from_dict(fields.apply_form(raw, specs, [3, 50, 0.1, ""]))
    assert config.data.concepts[0].instance_set.repeats == 3
    assert (config.validation.every_n_steps, config.validation.split, config.validation.path) == (50, 0.1, "")
