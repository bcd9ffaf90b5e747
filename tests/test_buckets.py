"""Aspect-ratio buckets, the bucket batch sampler, and DreamBooth pairing under bucketing."""
import math
from collections import Counter

import numpy as np
import pytest

from engine import config as cfg
from engine.data.buckets import bucket_grid, bucket_sizes, crop_box, plan_buckets
from engine.data.index import DataWarning, ImageRecord
from engine.data.sampler import BucketBatchSampler


def arb_config(resolution=512, **arb):
    return cfg.load(base={"data": {"resolution": resolution},
                          "aspect_ratio_bucket": {"enabled": True, **arb}})


def records(*sizes):
    return [ImageRecord(f"/data/img{i}.png", w, h, "p") for i, (w, h) in enumerate(sizes)]


# -- the bucket set ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [64, 512, 768, 1024])
def test_buckets_follow_the_grid_and_limits(resolution):
    config = arb_config(resolution)
    sizes = bucket_sizes(config)
    area, low, high, step = resolution ** 2 * 1.5, resolution / 2, resolution * 2, resolution / 8
    assert (resolution, resolution) in sizes
    assert len(set(sizes)) == len(sizes)
    assert set(sizes) == {(h, w) for w, h in sizes}
    for w, h in sizes:
        assert w % 8 == 0 and h % 8 == 0
        if (w, h) == (resolution, resolution):
            continue
        assert low <= w <= high and low <= h <= high and w * h <= area
        assert (w - low) % step == 0 and (h - low) % step == 0
    # For every width on the grid, the tallest height within the limits is there (and so its swap).
    grid = [low + k * step for k in range(int((high - low) / step) + 1)]
    for w in grid:
        tallest = max((h for h in grid if w * h <= area), default=None)
        if tallest is not None:
            assert (w, tallest) in sizes and (tallest, w) in sizes
    # Nothing else: every non-base bucket is the tallest of its width or the widest of its height.
    for w, h in sizes:
        if (w, h) != (resolution, resolution):
            assert h == max(x for x in grid if w * x <= area) or w == max(x for x in grid if h * x <= area)


def test_the_512_set_is_the_seeds():
    assert bucket_sizes(arb_config(512)) == [
        (256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768), (512, 704),
        (576, 640), (512, 512), (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384),
        (1024, 384), (1024, 320), (1024, 256)]


def test_manual_parameters_override_the_derived_ones():
    manual = {"base_res": [512, 512], "max_size": 393216, "dim_range": [256, 1024], "divisor": 64}
    assert bucket_sizes(arb_config(64, manual=manual)) == bucket_sizes(arb_config(512))
    grid = bucket_grid(arb_config(64, manual={"base_res": 320, "max_size": 320 * 320, "dim_range": [192, 448],
                                              "divisor": 64}))
    assert (grid.base, grid.max_area, grid.min_side, grid.max_side, grid.step) == ((320, 320), 102400, 192, 448, 64)
    with pytest.raises(cfg.ConfigError, match="aspect_ratio_bucket.manual.divisor"):
        bucket_grid(arb_config(512, manual={**manual, "divisor": 60}))


def test_bucketing_off_keeps_one_square_bucket_and_the_aspect_limit_bucketing_has():
    config = cfg.load(base={"data": {"resolution": 64}})
    with pytest.warns(DataWarning, match="img1.png: aspect ratio 50x1000 is beyond the limit bucketing has"):
        plan = plan_buckets(config, records((200, 100), (50, 1000)))
    assert plan.sizes == [(64, 64)] and plan.assignments == [0]
    assert [path for path, _ in plan.skipped] == ["/data/img1.png"]


# -- assignment -------------------------------------------------------------------------------------------

def test_a_2_to_1_image_lands_in_the_nearest_wide_bucket():
    config = arb_config(512)
    plan = plan_buckets(config, records((1024, 512), (512, 1024), (300, 300), (1000, 667)))
    chosen = [plan.sizes[b] for b in plan.assignments]
    assert chosen == [(832, 448), (448, 832), (512, 512), (768, 512)]
    # Brute force: no bucket is nearer to 2:1 in log-aspect, and it is a wide one.
    error = abs(math.log(832 / 448) - math.log(2))
    assert all(abs(math.log(w / h) - math.log(2)) >= error for w, h in plan.sizes)
    assert 1.8 < 832 / 448 < 2.2


def test_images_beyond_the_aspect_error_are_skipped_and_listed():
    config = arb_config(64)
    with pytest.warns(DataWarning) as caught:
        plan = plan_buckets(config, records((96, 96), (2000, 100), (100, 2000)))
    assert [r.path for r in plan.kept] == ["/data/img0.png"] and plan.indices == [0]
    assert [p for p, _ in plan.skipped] == ["/data/img1.png", "/data/img2.png"]
    assert all("max_aspect_error" in reason for _, reason in plan.skipped)
    assert ["img1.png" in str(w.message) for w in caught] == [True, False]
    # The limit is the log-aspect error: just under it is kept, at it is skipped.
    widest = max(w / h for w, h in plan.sizes)
    inside = records((round(100 * widest * math.exp(0.49)), 100))
    assert plan_buckets(config, inside).skipped == []
    with pytest.warns(DataWarning):
        assert len(plan_buckets(arb_config(64, max_aspect_error=0.2), inside).skipped) == 1


def test_images_too_small_to_train_are_skipped():
    config = arb_config(512)  # smallest bucket side 256: an image needs a side of 32 px
    with pytest.warns(DataWarning, match="too small"):
        plan = plan_buckets(config, records((31, 200), (32, 40)))
    assert [p for p, _ in plan.skipped] == ["/data/img0.png"] and plan.indices == [1]


def test_class_images_are_planned_against_the_instance_buckets():
    config = arb_config(64)
    instance_plan = plan_buckets(config, records((128, 64), (64, 64)))
    class_plan = plan_buckets(config, records((64, 128), (130, 66)), sizes=instance_plan.sizes)
    assert class_plan.sizes == instance_plan.sizes
    assert class_plan.sizes[class_plan.assignments[1]] == instance_plan.sizes[instance_plan.assignments[0]]


def test_crop_box_is_the_centre_crop_in_original_pixels():
    from PIL import Image

    from engine.data.dataset import crop_to_size

    assert crop_box((200, 100), (64, 64)) == (50, 0, 150, 100)
    assert crop_box((100, 300), (48, 112)) == (0, 33, 100, 267)
    # The box, resized to the bucket, is the picture crop_to_size produces.
    gradient = np.add.outer(np.arange(150), np.arange(240)).astype(np.uint8)
    image = Image.fromarray(gradient).convert("RGB")
    expected = np.asarray(crop_to_size(image, 56, 104, True, None), dtype=np.float32)
    box = crop_box(image.size, (56, 104))
    mine = np.asarray(image.crop(box).resize((56, 104), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(mine - expected).mean() < 2.0


# -- the sampler ------------------------------------------------------------------------------------------

BUCKETS = [0] * 7 + [1] * 5 + [2] * 1 + [3] * 11  # 24 images in four buckets


def epoch_of(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_image_once_per_epoch_and_one_bucket_per_batch():
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=5)
    for epoch in range(3):
        batches = epoch_of(sampler, epoch)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(BUCKETS)))
        assert all(len({BUCKETS[i] for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= 3 for batch in batches)
        # Only a bucket's last batch may be short (the documented leftover).
        short = Counter(BUCKETS[batch[0]] for batch in batches if len(batch) < 3)
        assert all(count == 1 for count in short.values())
        assert len(batches) == len(sampler) == sum(math.ceil(n / 3) for n in Counter(BUCKETS).values())


def test_same_seed_same_order_and_epochs_differ():
    first = [epoch_of(BucketBatchSampler(BUCKETS, 2, seed=11), e) for e in range(2)]
    again = [epoch_of(BucketBatchSampler(BUCKETS, 2, seed=11), e) for e in range(2)]
    other = epoch_of(BucketBatchSampler(BUCKETS, 2, seed=12), 0)
    assert first == again
    assert first[0] != first[1] and first[0] != other


def test_resuming_mid_epoch_yields_the_remaining_sequence():
    sampler = BucketBatchSampler(BUCKETS, 2, seed=3)
    full = epoch_of(sampler, 4)
    resumed = BucketBatchSampler(BUCKETS, 2, seed=3)
    resumed.set_epoch(4, start=5)  # as the trainer resumes from a TrainState of epoch 4, position 5
    assert list(resumed) == full[5:]
    assert list(resumed) == full  # after the resumed pass, the epoch starts from its beginning again


def test_two_ranks_are_disjoint_cover_the_epoch_and_agree_on_the_bucket():
    buckets = [0] * 8 + [1] * 4 + [2] * 12  # every bucket divisible by batch 2 x 2 ranks
    ranks = [BucketBatchSampler(buckets, 2, seed=9, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        per_rank = [epoch_of(s, epoch) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1])
        seen = [{i for batch in batches for i in batch} for batches in per_rank]
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(len(buckets)))
        for a, b in zip(*per_rank):
            assert buckets[a[0]] == buckets[b[0]] and len(a) == len(b)


def test_ranks_leave_out_fewer_than_world_size_images_per_bucket():
    ranks = [BucketBatchSampler(BUCKETS, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    per_rank = [epoch_of(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    left_out = Counter(BUCKETS) - Counter(BUCKETS[i] for i in seen)
    assert all(count < 3 for count in left_out.values())
    assert sum(left_out.values()) == sum(n % 3 for n in Counter(BUCKETS).values())


def test_buckets_are_drawn_in_proportion_to_what_they_have_left():
    sampler = BucketBatchSampler([0] * 90 + [1] * 10, batch_size=1, seed=0)
    firsts = Counter(int(epoch_of(sampler, e)[0][0] >= 90) for e in range(2000))
    assert 0.07 < firsts[1] / 2000 < 0.13


# -- DreamBooth pairing under bucketing --------------------------------------------------------------------

class FakeTokenizer:
    model_max_length = 77

    def __call__(self, text, truncation=True, max_length=77):
        return type("Tokens", (), {"input_ids": [0, len(text), 1]})()


def test_each_instance_image_gets_a_class_image_of_its_bucket_or_the_nearest(tmp_path):
    from PIL import Image

    from engine.data.dataset import DreamBoothDataset

    def folder(name, sizes):
        (tmp_path / name).mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (i * 20, 50, 90)).save(tmp_path / name / f"{i}.png")
        return [ImageRecord(str(tmp_path / name / f"{i}.png"), *size, name) for i, size in enumerate(sizes)]

    config = arb_config(64, max_aspect_error=1.0)
    instances = folder("inst", [(128, 64), (128, 64), (64, 128), (64, 64), (96, 96), (120, 40)])
    classes = folder("cls", [(128, 64), (64, 64), (70, 70)])  # no tall one, no very wide one
    instance_plan = plan_buckets(config, instances)
    class_plan = plan_buckets(config, classes, sizes=instance_plan.sizes)
    dataset = DreamBoothDataset(instance_plan.kept, instance_plan.assignments, instance_plan.sizes,
                                FakeTokenizer(), center_crop=True, seed=0, classes=class_plan.kept,
                                class_buckets=class_plan.assignments)
    sizes = instance_plan.sizes
    class_bucket = {r.path: b for r, b in zip(class_plan.kept, class_plan.assignments)}
    for epoch in range(4):  # more pairings than class images: the pool rotates, never runs out
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            bucket = instance_plan.assignments[index]
            width, height = sizes[bucket]
            assert item["instance"]["pixel_values"].shape == (3, height, width)
            assert item["class"]["pixel_values"].shape == (3, height, width)
            pool = dataset.class_pool[0, bucket]
            paired = {class_bucket[class_plan.kept[i].path] for i in pool}
            if bucket in class_plan.assignments:
                assert paired == {bucket}
            else:
                nearest = min(set(class_plan.assignments),
                              key=lambda b: abs(math.log(sizes[b][0] / sizes[b][1]) - math.log(width / height)))
                assert paired == {nearest}


def test_class_images_are_paired_within_their_concept(tmp_path):
    from engine.data.dataset import DreamBoothDataset

    config = arb_config(64)
    instances = records((64, 64), (64, 64), (128, 64))
    classes = [ImageRecord(f"/c/{i}.png", 64, 64, "c") for i in range(4)]
    instance_plan = plan_buckets(config, instances)
    class_plan = plan_buckets(config, classes, sizes=instance_plan.sizes)
    dataset = DreamBoothDataset(instance_plan.kept, instance_plan.assignments, instance_plan.sizes,
                                FakeTokenizer(), True, 0, classes=class_plan.kept,
                                class_buckets=class_plan.assignments, instance_groups=[0, 1, 1],
                                class_groups=[0, 0, 1, 1])
    square = instance_plan.assignments[0]
    assert dataset.class_pool[0, square] == [0, 1]
    assert dataset.class_pool[1, square] == [2, 3]
    assert dataset.class_pool[1, instance_plan.assignments[2]] == [2, 3]  # nearest bucket, same concept
    crops = dataset.crops()
    assert ("/c/0.png", instance_plan.sizes[square]) in crops
    assert ("/c/2.png", instance_plan.sizes[instance_plan.assignments[2]]) in crops
    assert ("/c/0.png", instance_plan.sizes[instance_plan.assignments[2]]) not in crops


def test_a_bucketed_training_run_sees_several_batch_shapes(tmp_path, class_images):
    import json

    from engine.train import Trainer
    from engine.testing import tiny_config

    values = tiny_config(tmp_path, **{
        "aspect_ratio_bucket.enabled": True, "data.resolution": 64, "trainer.max_steps": 6,
        "sampling.interval_steps": 0, "checkpoint.every_n_train_steps": None,
        "data.concepts[0].class_set.auto_generate.enabled": False})
    trainer = Trainer(cfg.from_dict(values))
    assert type(trainer.run()).__name__ == "Finished"
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    shapes = {(m["width"], m["height"]) for m in metrics}
    assert len(metrics) == 6 and len(shapes) >= 2
    assert shapes <= set(bucket_sizes(cfg.from_dict(values)))
    assert all("prior_loss" in m for m in metrics)


# -- the buckets command and report ------------------------------------------------------------------------

def test_buckets_command_prints_every_bucket_and_the_skipped_images(tmp_path):
    import json

    import yaml
    from PIL import Image

    from conftest import run_cli
    from engine.testing import tiny_config

    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("wide.png", (128, 64)), ("tall.png", (64, 128)), ("square.png", (70, 70)),
                       ("strip.png", (1000, 50)), ("broken.png", None)):
        if size:
            Image.new("RGB", size).save(folder / name)
        else:
            (folder / name).write_bytes(b"not a png")
    values = tiny_config(tmp_path, **{"aspect_ratio_bucket.enabled": True, "prior_preservation.enabled": False,
                                      "data.concepts": [{"instance_set": {"path": str(folder), "prompt": "x"}},
                                                        {"instance_set": {"path": "demo:sample-data/instance",
                                                                          "prompt": "sks"}}]})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(values))

    result = run_cli("buckets", "--config", str(config_file), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"buckets", "skipped"}
    sizes = bucket_sizes(cfg.from_dict(values))
    assert [(b["width"], b["height"]) for b in report["buckets"]] == sizes
    assert all(set(b) == {"width", "height", "count"} for b in report["buckets"])
    assert sum(b["count"] for b in report["buckets"]) == 3 + 10
    assert 0 in [b["count"] for b in report["buckets"]]
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {str(folder / "strip.png"), str(folder / "broken.png")}
    assert "max_aspect_error" in skipped[str(folder / "strip.png")]
    assert skipped[str(folder / "broken.png")].startswith("cannot read image")

    table = run_cli("buckets", "--config", str(config_file), "--set", "aspect_ratio_bucket.enabled=false")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    # without buckets the strip is skipped all the same: a square crop would be a sliver of it
    assert lines[1].split() == ["64x64", "1.00", "13"]
    assert "1 buckets, 13 images, 2 skipped" in table.stdout and f"skipped {folder / 'strip.png'}" in table.stdout

    missing = run_cli("buckets", "--config", str(config_file), "--set", "data.concepts[0].instance_set.path=/nope")
    assert missing.returncode == 2 and "data.concepts[0].instance_set.path" in missing.stderr


def test_bucket_report_lists_each_bucket_images_with_their_crop(tmp_path):
    from PIL import Image

    from engine.data.buckets_cli import bucket_report

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 60)).save(tmp_path / "rotated.jpg", exif=exif)  # upright it is 60 x 120
    Image.new("RGB", (200, 100)).save(tmp_path / "wide.png")
    config = cfg.load(base={"data": {"resolution": 64, "concepts": [{"instance_set": {"path": str(tmp_path)}}]},
                            "aspect_ratio_bucket": {"enabled": True}, "prior_preservation": {"enabled": False}})
    report = bucket_report(config)
    filled = {(b["width"], b["height"]): b["images"] for b in report["buckets"] if b["count"]}
    assert filled == {
        (56, 104): [{"path": str(tmp_path / "rotated.jpg"), "width": 60, "height": 120, "crop": [0, 4, 60, 116]}],
        (104, 56): [{"path": str(tmp_path / "wide.png"), "width": 200, "height": 100, "crop": [7, 0, 193, 100]}]}
    assert report["skipped"] == []
