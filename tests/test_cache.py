"""Latent and text-embedding caches: shards on disk, reuse, invalidation, and losses equal to uncached runs."""
import json
import os
import pickle

import pytest
import torch

from engine.data import cache
from engine import config as cfg
from engine.models.sd import StableDiffusion
from engine.plan import make_plan
from engine.testing import tiny_config

SD = StableDiffusion()


def test_shards_fill_stream_to_disk_and_reopen(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_BYTES", 1000)  # a shard holds three 400-byte tensors
    store = cache.ShardStore(tmp_path / "store")
    tensors = {f"k{i}": torch.full((10, 10), float(i)) for i in range(7)}
    with store.writer() as writer:
        for key, tensor in tensors.items():
            writer.add(key, tensor)
            assert len(writer.pending) <= 2  # never more than a shard in memory
    shards = sorted((tmp_path / "store").glob("*.safetensors"))
    assert len(shards) == 3 and not list((tmp_path / "store").glob(".*"))
    reopened = pickle.loads(pickle.dumps(cache.ShardStore(tmp_path / "store")))
    assert len(reopened) == 7
    for key, tensor in tensors.items():
        assert torch.equal(reopened.get(key), tensor)


def test_the_store_index_is_columns_and_keys_that_share_a_hash_are_still_told_apart(tmp_path, monkeypatch):
    store = cache.ShardStore(tmp_path / "many")
    with store.writer() as writer:
        for index in range(20_000):
            writer.add(f"{index:040x}", torch.zeros(1))
    # What each data-loader worker receives: 12 bytes per key, no string per key.
    assert len(pickle.dumps(cache.ShardStore(tmp_path / "many"))) < 20_000 * 12 + 2_000

    monkeypatch.setattr(cache, "key_hash", lambda key: 7)  # every key shares one hash
    store = cache.ShardStore(tmp_path / "same")
    for index in range(3):
        with store.writer() as writer:  # three shards, one key each
            writer.add(f"k{index}", torch.full((2,), float(index)))
    reopened = cache.ShardStore(tmp_path / "same")
    assert [reopened.get(f"k{i}").tolist() for i in range(3)] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    with pytest.raises(KeyError):
        reopened.get("k9")


def test_a_corrupt_shard_is_ignored(tmp_path):
    store = cache.ShardStore(tmp_path)
    with store.writer() as writer:
        writer.add("good", torch.ones(3))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    reopened = cache.ShardStore(tmp_path)
    assert "good" in reopened and len(reopened) == 1


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_text_cache_equals_the_encoder_at_any_padding(arch, tmp_path, request):
    from engine import config as cfg
    from engine.data.dataset import tokenize
    from engine.models.family import family_for

    model = request.getfixturevalue("tiny_model" if arch == "sd" else "tiny_sdxl")
    config = cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}})
    family = family_for(config)
    components = family.load(config)
    tokenizer, encoder = components.tokenizer, components.text_encoder
    prompts = {"a sks toy", "a red circle on a white background", ""}
    logs = []
    text_cache = cache.cache_text_embeddings(prompts, family, tokenizer, encoder, 2, torch.device("cpu"), None,
                                             tmp_path, logs.append)
    assert logs == [f"text-embedding cache {tmp_path}: 0 of 3 prompts cached, encoding 3"]
    rows = [tokenize(tokenizer, p) for p in sorted(prompts)]
    for length in (77, max(len(r) for r in rows)):  # pad_tokens true, then false (longest in batch)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row)
        with torch.no_grad():
            expected = family.encode_text(encoder, input_ids, 2)
        cached = text_cache.lookup(input_ids)
        assert sorted(cached) == sorted(expected) == sorted(family.conditioning_parts)
        assert cached["encoder_hidden_states"].shape == (3, length, 32 if arch == "sd" else 96)
        for part in cached:
            assert cached[part].shape == expected[part].shape
            assert torch.allclose(cached[part], expected[part], atol=1e-5)
    again = []
    cache.cache_text_embeddings(prompts, family, tokenizer, encoder, 2, torch.device("cpu"), None, tmp_path,
                                again.append)
    assert again == [f"text-embedding cache {tmp_path}: 3 of 3 prompts cached"]


def prepared(tmp_path, **overrides):
    from engine.models.sd import load_components
    from engine.data.prepare import prepare_data

    values = tiny_config(tmp_path, **{"prior_preservation.enabled": False, "cache.dir": str(tmp_path / "cache"),
                                      "cache.latents": True, **overrides})
    config = cfg.from_dict(values)
    components = load_components(config.model)
    return config, components, prepare_data(config, components.tokenizer, seed=0)


def counting_encodes(vae):
    calls = []
    real = vae.encode
    vae.encode = lambda pixels: calls.append(pixels.shape[0]) or real(pixels)
    return calls


def test_latents_are_encoded_once_and_rebuilt_only_when_inputs_change(tmp_path, sample_data):
    import shutil

    data_dir = tmp_path / "images"
    shutil.copytree(sample_data / "instance", data_dir)
    concept = [{"instance_set": {"path": str(data_dir), "prompt": "sks toy"}}]
    config, components, data = prepared(tmp_path, **{"data.concepts": concept})
    calls = counting_encodes(components.vae)
    logs = []
    cache.attach_caches(config, make_plan(config, "cpu"), SD, components, data.dataset, torch.device("cpu"),
                        lambda m, *a: logs.append(m))
    assert sum(calls) == 10 and data.dataset.latents is not None
    batch = next(iter(data.loader))
    assert "pixel_values" not in batch and batch["latent_params"].shape == (2, 8, 8, 8)  # mean and logvar

    # The same run again: nothing to encode.
    calls.clear()
    _, _, data = prepared(tmp_path, **{"data.concepts": concept})
    cache.attach_caches(config, make_plan(config, "cpu"), SD, components, data.dataset, torch.device("cpu"),
                        lambda m, *a: None)
    assert calls == []
    # A changed image file is encoded again, alone.
    os.utime(data_dir / "toy_03.png", ns=(5_000_000_000, 5_000_000_000))
    cache.attach_caches(config, make_plan(config, "cpu"), SD, components, data.dataset, torch.device("cpu"),
                        lambda m, *a: None)
    assert sum(calls) == 1
    # Another resolution, crop or VAE is another cache.
    calls.clear()
    config2, _, data2 = prepared(tmp_path, **{"data.concepts": concept, "data.resolution": 32})
    cache.attach_caches(config2, make_plan(config2, "cpu"), SD, components, data2.dataset, torch.device("cpu"),
                        lambda m, *a: None)
    assert sum(calls) == 10
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 2 and all(f.startswith("latents-") for f in folders)
    with torch.no_grad():
        components.vae.decoder.conv_out.bias.add_(0.01)  # the decoder does not change latents, but it is the VAE
    calls.clear()
    cache.attach_caches(config, make_plan(config, "cpu"), SD, components, data.dataset, torch.device("cpu"),
                        lambda m, *a: None)
    assert sum(calls) == 10 and len(list((tmp_path / "cache").iterdir())) == 3


def test_random_crops_turn_latent_caching_off_with_a_message(tmp_path, sample_data):
    config, components, data = prepared(tmp_path, **{"data.center_crop": False})
    logs = []
    cache.attach_caches(config, make_plan(config, "cpu"), SD, components, data.dataset, torch.device("cpu"),
                        lambda message, level="info": logs.append((level, message)))
    assert data.dataset.latents is None and not (tmp_path / "cache").exists()
    assert logs == [("warning", logs[0][1])] and "latents are not cached" in logs[0][1]


def run_steps(tmp_path, name, steps, **overrides):
    from engine.train import Trainer

    values = tiny_config(tmp_path / name, **{
        "trainer.max_steps": steps, "sampling.interval_steps": 0, "checkpoint.every_n_train_steps": None,
        "cache.dir": str(tmp_path / "cache"), "uncond.enabled": True, "uncond.p": 0.5, "uncond.cond": "eos",
        "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert type(result).__name__ == "Finished", result
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("model", ["demo:tiny-sd", "demo:tiny-flux"])
def test_cached_training_matches_uncached_training(model, tmp_path, class_images):
    plain = run_steps(tmp_path, "plain", 2, model=model)
    cached = run_steps(tmp_path, "cached", 2, model=model, **{"cache.latents": True, "cache.text_embeddings": True})
    shards = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert {p.parent.name.split("-")[0] for p in shards} == {"latents", "text"}
    for a, b in zip(plain, cached):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["prior_loss"] == pytest.approx(b["prior_loss"], rel=1e-5)
    # A second cached run reads the same shards and writes none.
    again = run_steps(tmp_path, "again", 1, model=model, **{"cache.latents": True, "cache.text_embeddings": True})
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == shards
    assert again[0]["loss"] == pytest.approx(cached[0]["loss"], rel=1e-6)


def test_the_cache_command_fills_what_training_then_reads(tmp_path, sample_data):
    import yaml

    from conftest import run_cli
    from engine import events
    from engine.train import Trainer

    values = tiny_config(tmp_path / "out", **{"prior_preservation.enabled": False, "cache.dir": str(tmp_path / "c"),
                                              "cache.latents": True, "cache.text_embeddings": True,
                                              "trainer.max_steps": 1, "sampling.interval_steps": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    result = run_cli("cache", "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "encoding 10" in result.stdout and "encoding 2" in result.stdout
    logged = []
    trained = Trainer(cfg.from_dict(values), on_event=lambda e: logged.append(e.message)
                      if isinstance(e, events.Log) else None).run()
    assert isinstance(trained, events.Finished)
    assert any(m.endswith("10 of 10 image crops cached") for m in logged), logged
    assert any(m.endswith("2 of 2 prompts cached") for m in logged), logged


def cache_tensors(folder):
    """Every tensor of the cache folders under `folder`, by (kind, key)."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        store = cache.ShardStore(sub)
        found.update({(sub.name.split("-")[0], key): store.get(key) for key in store.keys()})
    return found


def test_the_first_epoch_writes_the_caches_that_later_epochs_read(tmp_path, class_images, monkeypatch):
    from diffusers import AutoencoderKL

    from engine import events
    from engine.train import Trainer

    encoded = []
    real_encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: encoded.append(len(x))
                        or real_encode(self, x, *a, **k))

    def run(name, fill):
        values = tiny_config(tmp_path / name, **{
            "trainer.max_epochs": 2, "trainer.max_steps": None, "sampling.interval_steps": 0,
            "checkpoint.every_n_train_steps": None, "cache.dir": str(tmp_path / f"cache-{name}"),
            "cache.latents": True, "cache.text_embeddings": True, "cache.fill": fill,
            "data.concepts[0].class_set.auto_generate.enabled": False})
        steps, logs = [], []

        def on_event(event):
            if isinstance(event, events.Step):
                shards = list((tmp_path / f"cache-{name}").rglob("*.safetensors"))
                steps.append((event.epoch, sum(encoded), len(shards)))
                encoded.clear()
            elif isinstance(event, events.Log):
                logs.append(event.message)

        encoded.clear()
        assert isinstance(Trainer(cfg.from_dict(values), on_event=on_event).run(), events.Finished)
        return steps, logs

    before, before_logs = run("before", "before_training")
    filled, logs = run("filled", "first_epoch")
    first = [s for s in filled if s[0] == 0]
    assert len(first) >= 2 and len(filled) == len(before)
    # The first step trains before any cache is on disk, and every step of the first epoch runs the VAE on
    # its batch (instance and class rows); later epochs read the caches and never run it.
    assert filled[0][2] == 0 and before[0][2] > 0
    assert all(rows == 4 for _, rows, _ in first)
    assert all(rows == 0 for epoch, rows, _ in filled if epoch > 0)
    assert all(rows == 0 for _, rows, _ in before[1:])
    # What the epoch wrote is all the cache lacked when it ended, but for the empty caption (kept for
    # uncond.p), which this epoch never drew. (The class folder holds as many images as earlier tests made.)
    (built,) = [m for m in before_logs if m.startswith("latent cache")]
    crops = int(built.rpartition("encoding ")[2])
    (latent_line,) = [m for m in logs if m.startswith("latent cache")]
    (text_line,) = [m for m in logs if m.startswith("text-embedding cache")]
    assert crops >= 16 and latent_line.endswith(f": {crops} of {crops} image crops cached") and text_line.endswith(
        ": 2 of 3 prompts cached, encoding 1"), logs
    # The two ways give the same cache: the same keys, the same values.
    ours, theirs = cache_tensors(tmp_path / "cache-filled"), cache_tensors(tmp_path / "cache-before")
    assert sorted(ours) == sorted(theirs) and {kind for kind, _ in ours} == {"latents", "text"}
    for key, tensor in ours.items():
        assert torch.allclose(tensor, theirs[key], atol=1e-5), key


def test_a_cache_that_cannot_be_written_leaves_the_run_uncached(tmp_path, class_images, monkeypatch):
    from diffusers import AutoencoderKL

    from engine import events
    from engine.train import Trainer

    def full_disk(self):
        if self.pending:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.ShardWriter, "flush", full_disk)
    encoded = []
    real_encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: encoded.append(len(x))
                        or real_encode(self, x, *a, **k))
    values = tiny_config(tmp_path / "run", **{
        "trainer.max_epochs": 2, "trainer.max_steps": None, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": None, "cache.dir": str(tmp_path / "cache"), "cache.latents": True,
        "cache.fill": "first_epoch", "data.concepts[0].class_set.auto_generate.enabled": False})
    warnings = []
    result = Trainer(cfg.from_dict(values), on_event=lambda e: warnings.append(e.message)
                     if isinstance(e, events.Log) and e.level == "warning" else None).run()
    assert isinstance(result, events.Finished) and result.step == 10
    assert warnings == ["the cache cannot be written ([Errno 28] No space left on device); training goes on "
                        "without it"]
    # Both epochs encoded their batches: nothing was read from a cache.
    assert sum(encoded) == 10 * 4
