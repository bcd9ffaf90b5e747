"""Class image generation: exact counts, bucket split, idempotence, identical regeneration, stop."""
import json

import pytest
from PIL import Image

from conftest import run_cli
from engine import config as cfg
from engine import events
from engine.classgen import ClassGenJob, plan_class_images, split_target
from engine.errors import UserError


def classgen_values(tmp_path, instance_dir, **overrides):
    values = {
        "model": "demo:tiny-sd", "seed": 5, "output_dir": str(tmp_path / "out"),
        "data": {"resolution": 64, "concepts": [{
            "instance_set": {"path": str(instance_dir), "prompt": "sks toy"},
            "class_set": {"path": str(tmp_path / "class"), "prompt": "toy",
                          "auto_generate": {"enabled": True, "steps": 2, "cfg_scale": 2.0, "num_target": 5,
                                            "batch_size": 3}}}]},
    }
    config = cfg.load(base=values, overrides=[f"{k}={v}" for k, v in overrides.items()])
    return config


def class_pngs(tmp_path):
    return sorted((tmp_path / "class").glob("*.png"))


def test_split_keeps_the_total_and_follows_the_proportions():
    assert split_target(10, [3, 1, 1]) == [6, 2, 2]
    assert sum(split_target(7, [5, 3, 1, 1])) == 7
    assert split_target(100, [1, 0]) == [100, 0]


def test_generates_exactly_the_target_then_only_what_was_deleted(tmp_path, sample_data, tiny_model):
    config = classgen_values(tmp_path, sample_data / "instance")
    result = ClassGenJob(config).run()
    assert isinstance(result, events.Finished), result
    images = class_pngs(tmp_path)
    assert len(images) == 5
    assert all(Image.open(p).size == (64, 64) for p in images)
    sidecar = json.loads(images[0].with_suffix(".json").read_text())
    assert {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height"} <= set(sidecar)
    assert sidecar["prompt"] == "toy" and sidecar["steps"] == 2

    assert plan_class_images(config) == []
    again = ClassGenJob(config).run()
    assert again.summary["generated"] == 0 and len(class_pngs(tmp_path)) == 5

    deleted = {p.name: p.read_bytes() for p in images[:2]}
    for p in images[:2]:
        p.unlink()
    rerun = ClassGenJob(config).run()
    assert rerun.summary["generated"] == 2
    now = {p.name: p.read_bytes() for p in class_pngs(tmp_path)}
    assert len(now) == 5
    for name, data in deleted.items():
        assert now[name] == data


def test_bucketed_split_follows_the_instance_buckets(tmp_path, tiny_model):
    instance = tmp_path / "instance"
    instance.mkdir()
    sizes = [(128, 64)] * 3 + [(64, 64)] * 1
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (200, 30, 30)).save(instance / f"i{i}.png")
    config = classgen_values(tmp_path, instance, **{"aspect_ratio_bucket.enabled": "true",
                                                    "data.concepts[0].class_set.auto_generate.num_target": 8})
    tasks = plan_class_images(config)
    per_size = {}
    for task in tasks:
        per_size[(task.width, task.height)] = per_size.get((task.width, task.height), 0) + 1
    from engine.data.buckets import plan_buckets
    from engine.data.index import scan_folder

    plan = plan_buckets(config, scan_folder(str(instance), "x").records)
    wide = plan.sizes[plan.assignments[0]]
    square = plan.sizes[plan.assignments[3]]
    assert per_size == {wide: 6, square: 2}


def test_each_concept_is_batched_with_its_own_batch_size(tmp_path, sample_data, tiny_model):
    config = classgen_values(tmp_path, sample_data / "instance",
                             **{"data.concepts[0].class_set.auto_generate.num_target": 3})
    values = cfg.to_dict(config)
    second = json.loads(json.dumps(values["data"]["concepts"][0]))
    second["class_set"]["path"] = str(tmp_path / "class-2")
    second["class_set"]["auto_generate"].update(num_target=2, batch_size=1)
    values["data"]["concepts"].append(second)
    done = []

    def record(event):
        if isinstance(event, events.Progress) and event.done:
            done.append(event.done)

    result = ClassGenJob(cfg.from_dict(values), on_event=record).run()
    assert isinstance(result, events.Finished) and result.summary["generated"] == 5
    # One call of 3 for the first concept, then the second concept's images one at a time.
    assert done == [3, 4, 5]
    assert len(class_pngs(tmp_path)) == 3 and len(list((tmp_path / "class-2").glob("*.png"))) == 2


def test_stop_leaves_only_complete_images(tmp_path, sample_data, tiny_model):
    config = classgen_values(tmp_path, sample_data / "instance",
                             **{"data.concepts[0].class_set.auto_generate.num_target": 12,
                                "data.concepts[0].class_set.auto_generate.batch_size": 2})
    job = None

    def stop_after_first_image(event):
        if isinstance(event, events.Image):
            job.stop()

    job = ClassGenJob(config, on_event=stop_after_first_image)
    result = job.run()
    assert isinstance(result, events.Finished) and result.stopped
    images = class_pngs(tmp_path)
    assert len(images) == 2
    for image in images:
        Image.open(image).verify()
    assert not list((tmp_path / "class").glob(".tmp-*"))


def test_mistakes_are_one_line(tmp_path, sample_data):
    config = classgen_values(tmp_path, sample_data / "instance", **{"data.concepts[0].class_set.prompt": "' '"})
    with pytest.raises(UserError, match=r"class_set.prompt': the class prompt is empty"):
        plan_class_images(config)
    bad_model = tmp_path / "bad.yaml"
    values = cfg.to_dict(classgen_values(tmp_path, sample_data / "instance"))
    values["model"] = str(tmp_path / "missing-model")
    import yaml

    bad_model.write_text(yaml.safe_dump(values))
    result = run_cli("gen-class", "--config", str(bad_model))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: config key 'model': not found: {tmp_path / 'missing-model'}"


def test_generated_class_images_train(tmp_path, sample_data, tiny_model):
    from engine.testing import tiny_config
    from engine.train import Trainer

    config = classgen_values(tmp_path, sample_data / "instance")
    assert isinstance(ClassGenJob(config).run(), events.Finished)
    values = tiny_config(tmp_path / "runs", **{
        "data.concepts[0].class_set.path": str(tmp_path / "class"), "trainer.max_steps": 3,
        "sampling.interval_steps": 0})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished) and result.step == 3


def test_the_cli_shows_the_class_images_a_run_generates_before_it_trains(tmp_path, sample_data):
    import yaml

    from engine.testing import tiny_config

    values = tiny_config(tmp_path / "runs", **{
        "data.concepts[0].class_set.path": str(tmp_path / "class"), "trainer.max_steps": 1,
        "sampling.interval_steps": 0, "data.concepts[0].class_set.auto_generate.num_target": 3,
        "data.concepts[0].class_set.auto_generate.steps": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    result = run_cli("train", "--config", str(tmp_path / "run.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(class_pngs(tmp_path)) == 3
    # tqdm redraws its bar with carriage returns; the final state says all three are done
    bars = [part for part in result.stderr.replace("\r", "\n").splitlines() if part.startswith("class images")]
    assert bars and "3/3" in bars[-1]
