"""Per-concept repeats: each image of a concept is that many samples of an epoch, and resume stays exact."""
import json
from collections import Counter

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine import checkpoints, events
from engine import config as cfg
from engine.testing import tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tokenizer:
    pad_token_id = 0
    model_max_length = 77

    def __call__(self, text, truncation=True, max_length=77):
        return type("Tokens", (), {"input_ids": [1, len(text), 2]})()


def folder(path, count, colour):
    path.mkdir()
    for index in range(count):
        Image.new("RGB", (64, 64), (colour, 30 * index, 90)).save(path / f"{index}.png")
    return path


def two_concepts(tmp_path, prior=False, **overrides):
    """A concept of 2 images seen 3 times per epoch beside one of 6 images seen once."""
    small, large = folder(tmp_path / "small", 2, 40), folder(tmp_path / "large", 6, 200)
    concepts = [{"instance_set": {"path": str(small), "prompt": "sks toy", "repeats": 3}},
                {"instance_set": {"path": str(large), "prompt": "toy"}}]
    if prior:
        classes = str(folder(tmp_path / "class", 3, 120))
        for concept in concepts:
            concept["class_set"] = {"path": classes, "prompt": "toy"}
    return tiny_config(tmp_path, **{"prior_preservation.enabled": prior, "data.concepts": concepts,
                                    "sampling.interval_steps": 0, **overrides})


def test_an_epoch_holds_each_image_once_per_repeat_of_its_concept(tmp_path):
    from engine.data.prepare import prepare_data

    data = prepare_data(cfg.from_dict(two_concepts(tmp_path, prior=True)), Tokenizer(), seed=5)
    assert len(data.dataset) == 12 and data.images == 8
    for epoch in (0, 1):
        samples = [i for batch in data.sampler.epoch_batches(epoch) for i in batch]
        assert sorted(samples) == list(range(12))
        seen = Counter(data.dataset.instances[i].path for i in samples)
        assert seen == {**{str(tmp_path / "small" / f"{i}.png"): 3 for i in range(2)},
                        **{str(tmp_path / "large" / f"{i}.png"): 1 for i in range(6)}}
    assert len(data.sampler) == 6  # batches of 2

    # The copies of an image are separate samples: their own noise keys, and each its own class image.
    first = str(tmp_path / "small" / "0.png")
    copies = [data.dataset[i] for i, record in enumerate(data.dataset.instances) if record.path == first]
    assert len(copies) == 3
    assert len({item["instance"]["sample_key"] for item in copies}) == 3
    classes = [item["class"]["pixel_values"] for item in copies]
    assert not any(torch.equal(a, b) for i, a in enumerate(classes) for b in classes[i + 1:])


@pytest.mark.parametrize("repeats", [0, -2])
def test_repeats_below_one_are_refused(repeats):
    values = {"prior_preservation": {"enabled": False},
              "data": {"concepts": [{"instance_set": {"path": "x", "repeats": repeats}}]}}
    with pytest.raises(cfg.ConfigError, match=r"config key 'data.concepts\[0\].instance_set.repeats': must be a "
                                              r"whole number of at least 1"):
        cfg.from_dict(values)


def newest_weights(run_dir):
    newest = checkpoints.latest_checkpoint(run_dir)
    return newest.name, load_file(newest / "unet" / "diffusion_pytorch_model.safetensors")


def test_resume_mid_epoch_with_repeats_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    from engine.train import Trainer

    def values(name):
        return two_concepts(tmp_path / name, **{"trainer.max_steps": 9, "checkpoint.every_n_train_steps": 4})

    (tmp_path / "reference").mkdir()
    (tmp_path / "stopped").mkdir()
    reference = Trainer(cfg.from_dict(values("reference")))
    assert isinstance(reference.run(), events.Finished)
    epochs = [json.loads(line)["epoch"] for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0] * 6 + [1] * 3  # 12 samples in batches of 2: 6 steps per epoch

    def stop_after_step_4(event):
        if isinstance(event, events.CheckpointSaved) and event.step == 4:
            stopped.stop(save_checkpoint=False)  # ends after step 5, which is lost as by a kill

    stopped = Trainer(cfg.from_dict(values("stopped")), on_event=stop_after_step_4)
    result = stopped.run()
    assert isinstance(result, events.Finished) and result.stopped and result.step == 5
    assert checkpoints.latest_checkpoint(stopped.run_dir).name == "step-00000004"  # mid-epoch: position 4 of 6

    seen = []
    resumed = Trainer.for_resume(str(stopped.run_dir), on_event=seen.append)
    assert isinstance(resumed.run(), events.Finished)
    assert not [e for e in seen if isinstance(e, events.Log) and "data position" in e.message]
    expected_name, expected = newest_weights(reference.run_dir)
    actual_name, actual = newest_weights(stopped.run_dir)
    assert expected_name == actual_name == "step-00000009"
    worst = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst

    seen.clear()
    changed = Trainer.for_resume(str(stopped.run_dir), overrides=["trainer.max_steps=10",
                                                                  "data.concepts[0].instance_set.repeats=2"],
                                 on_event=seen.append)
    assert isinstance(changed.run(), events.Finished)
    assert any(isinstance(e, events.Log) and e.message.startswith("--set data changes what the saved data position")
               for e in seen)
