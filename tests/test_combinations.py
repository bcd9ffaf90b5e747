"""The combination matrix: every shipped preset end to end on the tiny model, and a pairwise-covering set
of option combinations, each trained for a few steps with one sampling round and one checkpoint."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from combinations import (EMBEDDING_TOKEN, FACTORS, FAMILY_REFUSED, FLOW_FACTORS, FLOW_FAMILY_REFUSED, FLOW_ROW_MODELS,
                          FSDP_REFUSED,
                          INELIGIBLE, PRESET_CLASS_IMAGES, PRESET_STEPS, PRESETS, ROW_CLASS_IMAGES, ROW_STEPS,
                          all_pairs, changed_elements, flow_row_values, messages, pairs_of, pairwise_rows,
                          preset_to_tiny, read_metrics, refused_pairs, row_id, row_values, tensor_dtypes)
from engine import checkpoints, paths
from engine.vram import BNB_MIN_8BIT_SIZE
from engine import config as cfg
from engine import events

# Any seed covers every pair; 913 gives 14 rows for these factors (most seeds 15 or more), 5 of them compiled,
# one of those with buckets (each bucket's size compiles its own graphs).
PAIRWISE_SEED = 913
MAX_ROWS = 14  # each row is a training run: more would outgrow the matrix's time budget
CAPTIONED = "demo:sample-data/finetune"
MODEL_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
               "text_encoder_2": "text_encoder_2/model.safetensors"}
# Placeholder paths: the config loader checks that paths are given, not that they exist.
_PROBE_PATHS = dict(output_dir=Path("out"), class_dir=Path("class"), existing_class_dir=Path("class-existing"),
                    embedding_file=Path(f"{EMBEDDING_TOKEN}.safetensors"), cache_dir=Path("cache"))


_FLOW_PROBE_PATHS = dict(output_dir=Path("out"), class_dir=Path("class"), cache_dir=Path("cache"))


def _probe_values(row):
    return row_values(row, **_PROBE_PATHS)


REFUSED = refused_pairs(FACTORS, _probe_values)
ROWS = pairwise_rows(FACTORS, set(REFUSED) | INELIGIBLE | set(FAMILY_REFUSED), seed=PAIRWISE_SEED)
ROW_IDS = [row_id(i, row, FACTORS) for i, row in enumerate(ROWS)]

# 17 rows (the families' five stand-ins times base_dtype's three levels need 15), 5 of them compiled, the fewest
# pairwise covering allows: one per family, Qwen-Image-Edit's with buckets.
FLOW_SEED = 506
MAX_FLOW_ROWS = 17
FLOW_REFUSED = refused_pairs(FLOW_FACTORS, lambda row: flow_row_values(row, **_FLOW_PROBE_PATHS))
FLOW_ROWS = pairwise_rows(FLOW_FACTORS, set(FLOW_REFUSED) | set(FLOW_FAMILY_REFUSED), seed=FLOW_SEED)
FLOW_ROW_IDS = [row_id(i, row, FLOW_FACTORS) for i, row in enumerate(FLOW_ROWS)]

# What engine.config.validate() documents as refused among these factors, and the key each message names.
EXPECTED_REFUSED = {
    (("fused", "on"), ("gradclip", "on")): "optimizer.fused_backward",
    (("fused", "on"), ("precision", "16")): "trainer.precision",
    (("bf16w", "on"), ("precision", "16")): "trainer.precision",
    (("swap", "on"), ("compile", "on")): "compile",
}
EXPECTED_FLOW_REFUSED = {
    (("fused", "on"), ("gradclip", "on")): "optimizer.fused_backward",
    (("network", "full"), ("base", "nf4")): "base_dtype",
    (("network", "full"), ("swap", "on")): "memory.blocks_on_cpu",
    (("swap", "on"), ("compile", "on")): "compile",
}
# the tensors peft starts at zero, one of which any trained adapter has moved
ZERO_STARTED = re.compile(r"\.(lora_B|lokr_w1|lokr_w1_a|hada_w2_b)(\.|$)")


def assert_weights_moved(tiny_model, checkpoint, names, base_files=None):
    """The trained weights differ from the base model's (its files by component in base_files, as a
    checkpoint's by default); an adapter's from its zero start (lora_B)."""
    if checkpoints.read_meta(checkpoint)["network"] != "full":
        assert (checkpoint / "adapter.safetensors").is_file()
        for name in names:
            adapter = load_file(checkpoint / name / "adapter_model.safetensors")
            assert max(t.abs().max().item() for k, t in adapter.items() if ".lora_B." in k) > 0, name
        return
    base_files = base_files or MODEL_FILES
    for name in names:
        assert changed_elements(tiny_model / base_files[name], checkpoint / MODEL_FILES[name]) > 0, name


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def embedding_file(tmp_path_factory):
    """A two-vector textual-inversion embedding for the tiny text encoder (hidden size 32)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("embeddings") / f"{EMBEDDING_TOKEN}.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


def train(config, steps: int):
    """Train config to its end; asserts what every run must show: `steps` steps with finite losses and one
    checkpoint, at the end. Returns (run folder, metrics, checkpoint, log events)."""
    from engine.train import Trainer

    log = []
    result = Trainer(config, on_event=lambda e: log.append(e) if isinstance(e, events.Log) else None).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    assert result.step == steps and not result.stopped
    run_dir = Path(result.run_dir)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    (checkpoint,) = checkpoints.list_checkpoints(run_dir)
    assert checkpoint.name == checkpoints.checkpoint_name(steps)
    return run_dir, metrics, checkpoint, log


def assert_caches(log, cache_dir: Path, latents: bool, text: bool) -> None:
    assert bool(messages(log, "latent cache ")) == latents
    assert bool(list(cache_dir.glob("latents-*/*.safetensors"))) == latents
    assert bool(messages(log, "text-embedding cache ")) == text
    assert bool(list(cache_dir.glob("text-*/*.safetensors"))) == text


def assert_compiled(log, metrics, compiled: bool) -> None:
    """The first step compiled the blocks (a later one too where its bucket's size is new), the compile seconds
    reported apart; a run without compile has neither."""
    assert bool(messages(log, "compile: ")) == compiled
    assert (metrics[0].get("compile_s", 0) > 0) == compiled
    assert any("compile_s" in m for m in metrics) == compiled


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


# -- the generator and the refused combinations -----------------------------------------------------------

def test_generator_covers_every_pair_and_is_stable_for_a_seed():
    factors = {"a": ["0", "1"], "b": ["0", "1", "2"], "c": ["0", "1"], "d": ["0", "1"]}
    forbidden = {(("a", "1"), ("b", "2"))}
    for seed in range(5):
        rows = pairwise_rows(factors, forbidden, seed=seed)
        assert rows == pairwise_rows(factors, forbidden, seed=seed)
        covered = set().union(*(pairs_of(row, list(factors)) for row in rows))
        assert covered == all_pairs(factors) - forbidden
        assert 6 <= len(rows) <= 8  # b x (a or c or d) needs 6; exhaustive would be 24


def test_rows_cover_every_pair_of_option_values():
    names = list(FACTORS)
    covered = set().union(*(pairs_of(row, names) for row in ROWS))
    excluded = set(REFUSED) | INELIGIBLE | set(FAMILY_REFUSED)
    assert INELIGIBLE | set(FAMILY_REFUSED) <= all_pairs(FACTORS)
    required = all_pairs(FACTORS) - excluded
    assert sorted(required - covered) == []
    assert not covered & excluded
    assert all(list(row) == names for row in ROWS)
    assert pairwise_rows(FACTORS, excluded, seed=PAIRWISE_SEED) == ROWS
    # Two 3-level factors need at least 9 rows; every combination would be over a million runs.
    assert 9 <= len(ROWS) <= MAX_ROWS < math.prod(len(levels) for levels in FACTORS.values())
    assert len(set(ROW_IDS)) == len(ROWS)
    for row in ROWS:
        cfg.from_dict(_probe_values(row))  # no row trips a refusal of three or more options


def test_the_refused_pairs_are_the_ones_validate_documents():
    assert set(REFUSED) == set(EXPECTED_REFUSED)
    assert {pair: message.split("'")[1] for pair, message in FLOW_REFUSED.items()} == EXPECTED_FLOW_REFUSED


def test_the_flow_rows_cover_every_pair_of_their_option_values():
    names = list(FLOW_FACTORS)
    covered = set().union(*(pairs_of(row, names) for row in FLOW_ROWS))
    excluded = set(FLOW_REFUSED) | set(FLOW_FAMILY_REFUSED)
    assert set(FLOW_FAMILY_REFUSED) <= all_pairs(FLOW_FACTORS)
    assert sorted(all_pairs(FLOW_FACTORS) - excluded - covered) == []
    assert not covered & excluded
    assert set(FLOW_FACTORS["model"]) == set(FLOW_ROW_MODELS)
    assert 15 <= len(FLOW_ROWS) <= MAX_FLOW_ROWS and len(set(FLOW_ROW_IDS)) == len(FLOW_ROWS)
    for row in FLOW_ROWS:
        cfg.from_dict(flow_row_values(row, **_FLOW_PROBE_PATHS))


@pytest.mark.parametrize("pair", sorted(EXPECTED_REFUSED), ids=lambda p: f"{p[0][0]}_{p[0][1]}+{p[1][0]}_{p[1][1]}")
def test_a_refused_combination_raises_a_config_error_naming_its_key(pair):
    (a, x), (b, y) = pair
    row = {**{name: levels[0] for name, levels in FACTORS.items()}, a: x, b: y}
    with pytest.raises(cfg.ConfigError, match=rf"^config key '{EXPECTED_REFUSED[pair]}'"):
        cfg.from_dict(_probe_values(row))


# -- shipped presets --------------------------------------------------------------------------------------

def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for item in value:  # list items merge under `key[]`: the rewrite treats every item alike
            for key, leaf in _flatten(item, f"{prefix}[]").items():
                out.setdefault(key, []).append(leaf)
        return out
    return {prefix: value}


REWRITTEN_KEYS = {
    "model", "vae", "tokenizer", "text_encoder", "text_encoder_2", "output_dir", "num_workers", "data.resolution",
    "data.concepts[].instance_set.path", "data.concepts[].instance_set.control_path", "data.concepts[].class_set.path",
    "data.concepts[].class_set.auto_generate.num_target", "data.concepts[].class_set.auto_generate.steps",
    "trainer.max_steps", "trainer.max_epochs", "sampling.interval_steps", "sampling.concepts[].width",
    "sampling.concepts[].height", "sampling.concepts[].steps", "sampling.concepts[].num_samples",
    "checkpoint.every_n_train_steps", "memory.blocks_on_cpu",
}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_the_preset_rewrite_changes_only_what_cannot_run_here(preset, tmp_path):
    before = _flatten(cfg.to_dict(cfg.load(preset)))
    after = _flatten(cfg.to_dict(preset_to_tiny(preset, tmp_path, tmp_path / "class", CAPTIONED)))
    assert before.keys() == after.keys()
    changed = {key for key in before if before[key] != after[key]}
    assert changed <= REWRITTEN_KEYS, changed - REWRITTEN_KEYS
    for key in ("trainer.precision", "trainer.accelerator", "optimizer.name", "optimizer.fused_backward",
                "cache.latents", "cache.text_embeddings", "cache.fill", "weights_dtype", "clip_stop_at_layer",
                "batch_size", "data.concepts[].class_set.auto_generate.enabled"):
        if key in before:
            assert after[key] == before[key], key


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_end_to_end_on_the_tiny_model(preset, tmp_path, sample_data):
    from engine import paths

    assert len(pngs(sample_data / "finetune")) == len(list((sample_data / "finetune").glob("*.txt"))) > 0
    config = preset_to_tiny(preset, tmp_path / "out", tmp_path / "class", CAPTIONED)
    arch = {"demo:tiny-sdxl": "sdxl", "demo:tiny-flux": "flux", "demo:tiny-flux-schnell": "flux-schnell",
            "demo:tiny-chroma": "chroma", "demo:tiny-z-image": "z-image",
            "demo:tiny-qwen-image": "qwen-image", "demo:tiny-qwen-image-edit": "qwen-image-edit",
            "demo:tiny-flux2-klein": "flux2-klein"}.get(config.model, "sd")
    run_dir, _, checkpoint, _ = train(config, PRESET_STEPS)
    meta = checkpoints.read_meta(checkpoint)
    # SDXL trains both text encoders; Flux.1 only the first (T5 never trains)
    encoders = tuple(name for name in config.trained_text_encoders if arch == "sdxl" or name == "text_encoder")
    expected_trained = sorted(("unet",) + encoders)
    assert meta["trained"] == expected_trained
    # a transformer model's folder keeps the denoising model in transformer/
    base_files = ({**MODEL_FILES, "unet": "transformer/diffusion_pytorch_model.safetensors"}
                  if arch.startswith(("flux", "chroma", "z-image", "qwen-image")) else None)
    assert_weights_moved(paths.demo_model_dir(arch), checkpoint, expected_trained, base_files)
    if "8bit" in config.optimizer.name:
        # bitsandbytes runs on the CPU: tensors of 4096 weights or more keep two uint8 moments (AdamW's).
        trained_files = [checkpoint / name / ("adapter_model.safetensors" if meta["network"] != "full" else
                                              MODEL_FILES[name].split("/")[1]) for name in expected_trained]
        large = sum(t.numel() >= BNB_MIN_8BIT_SIZE for file in trained_files for t in load_file(file).values())
        dtypes = tensor_dtypes(checkpoints.load_state(checkpoint)["optimizer"])
        assert dtypes.count(torch.uint8) >= 2 * large  # (a bf16 run's rounding generator state is uint8 too)

    expected_samples = sum(prompt.num_samples for prompt in config.sampling.concepts)
    assert [p.parent.name for p in run_dir.glob("samples/*/*.png")] == [f"{PRESET_STEPS:06d}"] * expected_samples

    for index, concept in enumerate(config.data.concepts):
        if config.prior_preservation.enabled and concept.class_set and concept.class_set.auto_generate.enabled:
            assert len(pngs(tmp_path / "class" / str(index))) == PRESET_CLASS_IMAGES


# -- pairwise option rows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_option_row_trains_samples_and_saves(row, tmp_path, tiny_model, class_images, embedding_file):
    on = {name: level == "on" for name, level in row.items()}
    existing = pngs(class_images)
    config = cfg.from_dict(row_values(row, tmp_path / "out", tmp_path / "class", class_images, embedding_file,
                                      tmp_path / "cache"))
    run_dir, metrics, checkpoint, log = train(config, ROW_STEPS)
    if row["prior"] != "off":
        assert all(math.isfinite(m["prior_loss"]) and math.isfinite(m["instance_loss"]) for m in metrics)
    else:
        assert not any("prior_loss" in m for m in metrics)

    assert [p.parent for p in run_dir.glob("samples/*/*.png")] == [run_dir / "samples" / f"{ROW_STEPS:06d}"]

    assert (checkpoint / "text_encoder").is_dir() == on["te"]
    assert (checkpoint / "ema_unet").is_dir() == on["ema"]
    # The warmup starts at lr 0, so only the last step moves the weights: the optimizer (fused into
    # backward, after accumulation, onto bf16 weights) must have reached them.
    base = paths.demo_model_dir(row["model"]) if row["model"] != "sd" else tiny_model
    # a Flux folder keeps the denoising model in transformer/
    base_files = ({**MODEL_FILES, "unet": "transformer/diffusion_pytorch_model.safetensors"}
                  if row["model"] == "flux" else None)
    assert_weights_moved(base, checkpoint, ["unet"] + (["text_encoder"] if on["te"] else []), base_files)
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    # DDPM models record their prediction type; a flow-matching schedule has none
    assert checkpoints.read_meta(checkpoint)["prediction_type"] == scheduler.get("prediction_type")

    generated = pngs(tmp_path / "class")
    assert len(generated) == (ROW_CLASS_IMAGES if row["prior"] == "gen" else 0)
    assert pngs(class_images) == existing  # a filled folder with auto_generate off is only read

    # Rows hold no INELIGIBLE pair, so a requested cache is built and read, and nothing is cached unasked.
    assert_caches(log, tmp_path / "cache", latents=on["latents"], text=on["textcache"])

    if on["ti"]:
        assert messages(log, f"loaded custom embeddings: {EMBEDDING_TOKEN}")
    if row["precision"] == "16" and not on["bf16w"]:
        assert messages(log, "fp16 mixed precision needs CUDA", "warning")
    assert_compiled(log, metrics, on["compile"])


@pytest.mark.parametrize("row", FLOW_ROWS, ids=FLOW_ROW_IDS)
def test_flow_family_row_trains_samples_validates_and_saves(row, tmp_path):
    on = {name: level == "on" for name, level in row.items()}
    config = cfg.from_dict(flow_row_values(row, tmp_path / "out", tmp_path / "class", tmp_path / "cache"))
    run_dir, metrics, checkpoint, log = train(config, ROW_STEPS)
    assert all(("prior_loss" in m) == (row["prior"] == "gen") for m in metrics)
    assert len(pngs(tmp_path / "class")) == (ROW_CLASS_IMAGES if row["prior"] == "gen" else 0)
    assert [("val_loss" in m) for m in metrics] == [False] * (ROW_STEPS - 1) + [on["val"]]
    assert [p.parent for p in run_dir.glob("samples/*/*.png")] == [run_dir / "samples" / f"{ROW_STEPS:06d}"]
    assert_caches(log, tmp_path / "cache", latents=on["latents"], text=on["textcache"])
    assert_compiled(log, metrics, on["compile"])

    meta = checkpoints.read_meta(checkpoint)
    assert meta["network"] == row["network"] and meta["trained"] == (["ema_unet", "unet"] if on["ema"] else ["unet"])
    assert (checkpoint / "ema_unet").is_dir() == on["ema"]
    # The warmup starts at lr 0, so only the last step moves the weights: the optimizer (fused into backward,
    # after accumulation, onto bf16 weights, over swapped blocks) must have reached them.
    if row["network"] == "full":
        base = paths.demo_model_dir(FLOW_ROW_MODELS[row["model"]].removeprefix("demo:tiny-"))
        assert changed_elements(base / "transformer/diffusion_pytorch_model.safetensors",
                                checkpoint / MODEL_FILES["unet"]) > 0
    else:
        adapter = load_file(checkpoint / "unet" / "adapter_model.safetensors")
        moved = [key for key, tensor in adapter.items() if ZERO_STARTED.search(key) and tensor.abs().max() > 0]
        assert moved, sorted(adapter)[:4]
        assert (checkpoint / "adapter.safetensors").is_file()


@pytest.mark.parametrize("pair", sorted(FAMILY_REFUSED), ids=lambda pair: "+".join(f"{n}_{v}" for n, v in pair))
def test_a_combination_the_model_family_refuses_stops_at_start_naming_its_key(pair, tmp_path, class_images,
                                                                            embedding_file):
    from engine.train import Trainer

    defaults = {name: levels[0] for name, levels in FACTORS.items()}
    config = cfg.from_dict(row_values({**defaults, **dict(pair)}, tmp_path / "out", tmp_path / "class",
                                      class_images, embedding_file, tmp_path / "cache"))
    result = Trainer(config).run()
    assert isinstance(result, events.Failed) and result.user_error, result
    assert result.error.startswith(f"config key '{FAMILY_REFUSED[pair]}'"), result.error
    assert not list((tmp_path / "out").glob("*/*/checkpoints"))


@pytest.mark.parametrize("pair", sorted(FLOW_FAMILY_REFUSED), ids=lambda pair: "+".join(f"{n}_{v}" for n, v in pair))
def test_a_combination_a_flow_family_refuses_stops_at_start_naming_its_key(pair, tmp_path):
    from engine.train import Trainer

    defaults = {name: levels[0] for name, levels in FLOW_FACTORS.items()}
    config = cfg.from_dict(flow_row_values({**defaults, **dict(pair)}, tmp_path / "out", tmp_path / "class",
                                           tmp_path / "cache"))
    result = Trainer(config).run()
    assert isinstance(result, events.Failed) and result.user_error, result
    assert result.error.startswith(f"config key '{FLOW_FAMILY_REFUSED[pair]}'"), result.error
    assert not list((tmp_path / "out").glob("*/*/checkpoints"))


@pytest.mark.parametrize("level", [None, *sorted(FSDP_REFUSED)], ids=lambda level: "+".join(level or ["default"]))
def test_fsdp_over_two_processes_shards_the_default_row_and_refuses_what_it_cannot_shard(level, tmp_path,
                                                                                       embedding_file):
    from engine.plan import make_plan

    row = {name: levels[0] for name, levels in FACTORS.items()}
    if level:
        row[level[0]] = level[1]
    values = row_values(row, tmp_path / "out", tmp_path / "class", tmp_path / "class", embedding_file,
                        tmp_path / "cache")
    values["trainer"]["strategy"] = "fsdp"
    config = cfg.from_dict(values)
    if level is None:
        assert make_plan(config, "cpu", 2).sharded
        return
    with pytest.raises(cfg.ConfigError, match=rf"^config key '{FSDP_REFUSED[level]}': "):
        make_plan(config, "cpu", 2)


def test_caches_requested_where_their_rules_exclude_them_fall_back_with_a_warning(tmp_path, tiny_model,
                                                                                   embedding_file):
    defaults = {name: levels[0] for name, levels in FACTORS.items()}
    row = {**defaults, **{name: level for pair in INELIGIBLE for name, level in pair}}
    assert row["latents"] == row["textcache"] == row["augment"] == row["te"] == "on" and row["centercrop"] == "off"
    config = cfg.from_dict(row_values(row, tmp_path / "out", tmp_path / "class", tmp_path / "class",
                                      embedding_file, tmp_path / "cache"))
    *_, log = train(config, ROW_STEPS)
    assert len(messages(log, "latents are not cached", "warning")) == 1
    assert len(messages(log, "text embeddings are not cached", "warning")) == 1
    assert_caches(log, tmp_path / "cache", latents=False, text=False)
