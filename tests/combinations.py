"""Helpers for the combination matrix: a deterministic all-pairs generator, the option factors, and the
rewrite of a shipped preset into a run that fits the tiny demo model."""
from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Callable, Iterable, Optional

from engine import config as cfg
from engine.testing import tiny_config
from engine.vram import guess_architecture

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))

Pair = tuple[tuple[str, str], tuple[str, str]]


# -- all-pairs generation ---------------------------------------------------------------------------------

def all_pairs(factors: dict[str, list[str]]) -> set[Pair]:
    """Every ((factor, level), (factor, level)) of two different factors, factors in dict order."""
    names = list(factors)
    return {((a, x), (b, y)) for i, a in enumerate(names) for b in names[i + 1:]
            for x in factors[a] for y in factors[b]}


def pairs_of(row: dict[str, str], names: list[str]) -> set[Pair]:
    present = [n for n in names if n in row]
    return {((a, row[a]), (b, row[b])) for i, a in enumerate(present) for b in present[i + 1:]}


def pairwise_rows(factors: dict[str, list[str]], forbidden: Iterable[Pair] = (), seed: int = 0,
                  candidates: int = 24) -> list[dict[str, str]]:
    """A small set of rows (factor -> level) in which every allowed pair of levels occurs at least once.

    Greedy, in the manner of AETG: each new row starts from an uncovered pair, then fills the remaining
    factors one at a time (in a shuffled order) with the level that covers the most uncovered pairs;
    of `candidates` such rows the one covering most is kept. No row holds a forbidden pair. All choices
    come from random.Random(seed), so the same factors and seed always give the same rows.
    """
    names = list(factors)
    forbidden = set(forbidden)
    uncovered = all_pairs(factors) - forbidden
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []

    def allowed(row: dict[str, str], name: str, level: str) -> bool:
        trial = {**row, name: level}
        return not (pairs_of(trial, names) & forbidden)

    while uncovered:
        best, best_gain = None, -1
        for _ in range(candidates):
            (a, x), (b, y) = rng.choice(sorted(uncovered))
            row = {a: x, b: y}
            rest = [n for n in names if n not in row]
            rng.shuffle(rest)
            for name in rest:
                options = [level for level in factors[name] if allowed(row, name, level)]
                if not options:
                    raise ValueError(f"no level of {name!r} fits with {row}")
                gains = [len(pairs_of({**row, name: level}, names) & uncovered) for level in options]
                top = max(gains)
                row[name] = rng.choice([level for level, gain in zip(options, gains) if gain == top])
            ordered = {n: row[n] for n in names}
            gain = len(pairs_of(ordered, names) & uncovered)
            if gain > best_gain:
                best, best_gain = ordered, gain
        rows.append(best)
        uncovered -= pairs_of(best, names)
    return rows


def row_id(index: int, row: dict[str, str], factors: dict[str, list[str]]) -> str:
    """`r03-clip2+prior_gen+ema+...`: the levels that differ from each factor's first (default) level."""
    changed = [f"{name}_{level}" if len(factors[name]) > 2 else name if level == "on" else f"{name}{level}"
               for name, level in row.items() if level != factors[name][0]]
    return f"r{index:02d}-" + ("+".join(changed) or "defaults")


# -- the option factors -------------------------------------------------------------------------------------

# Each factor's first level is the default; row ids name only the others.
FACTORS: dict[str, list[str]] = {
    "clip": ["1", "2"],                    # clip_stop_at_layer
    "prior": ["off", "gen", "existing"],   # prior preservation: off, generated class images, a filled folder
    "latents": ["off", "on"],              # cache.latents
    "textcache": ["off", "on"],            # cache.text_embeddings
    "centercrop": ["off", "on"],           # data.center_crop (cached latents need it)
    "buckets": ["off", "on"],              # aspect_ratio_bucket.enabled
    "ema": ["off", "on"],                  # ema.enabled, and samples drawn with the averaged weights
    "te": ["off", "on"],                   # train_text_encoder
    "fused": ["off", "on"],                # optimizer.fused_backward
    "accum": ["1", "2"],                   # trainer.accumulate_grad_batches
    "bf16w": ["off", "on"],                # weights_dtype: bf16
    "precision": ["32", "bf16", "16"],     # trainer.precision (16 falls back to fp32 on the CPU)
    "gradclip": ["off", "on"],             # trainer.gradient_clip_val
    "uncond": ["off", "on"],               # uncond.enabled
    "minsnr": ["off", "on"],               # min_snr_gamma
    "model": ["sd", "sd21", "flux"],       # the stand-in trained: SD1.5, SD2.1 768 v-prediction, Flux.1-dev
    "noiseoffset": ["off", "on"],          # noise_offset
    "augment": ["off", "on"],              # hflip, rotate and colour jitter
    "ti": ["off", "on"],                   # custom_embeddings (a textual-inversion file)
    "locon": ["off", "on"],                # network: a LoRA adapter over the UNet's 3x3 convolutions too
    # base_dtype: the frozen text encoder (and an adapter's base) stored; nf4 needs an adapter, so its rows train
    # a LoRA (over the convolutions too with locon). bf16 storage is left to the presets that use it: a fourth
    # level would need more than MAX_ROWS rows.
    "base": ["fp32", "fp8", "nf4"],
    # memory.blocks_on_cpu: 1 (the last repeated block swapped); a full fine-tune needs fused backward, so
    # without it these rows train a LoRA
    "swap": ["off", "on"],
    "offload": ["off", "on"],              # memory.offload_activations, with gradient_checkpointing
    "compile": ["off", "on"],              # compile: the denoiser's repeated blocks and the VAE encoder
}

# Pairs whose meaning is "this cache is off", which the engine says with a warning (cache.attach_caches):
# latents are cached only with a centre crop and no augmentation, text embeddings only while the text
# encoder is frozen. Rows avoid them so that every "on" row really trains from the cache; one separate
# test checks the warnings.
# What the Flux.1 family refuses at start, naming the key (it has no CLIP skip, textual inversion, DDPM
# loss weights or convolutions): rows avoid these pairs, and one test checks each refusal.
FAMILY_REFUSED: dict[Pair, str] = {
    (("clip", "2"), ("model", "flux")): "clip_stop_at_layer",
    (("minsnr", "on"), ("model", "flux")): "min_snr_gamma",
    (("model", "flux"), ("ti", "on")): "custom_embeddings.enabled",
    (("model", "flux"), ("locon", "on")): "network.conv_rank",
}
# the stand-in of each model level
ROW_MODELS = {"sd": "demo:tiny-sd", "sd21": "demo:tiny-sd21", "flux": "demo:tiny-flux"}

INELIGIBLE: set[Pair] = {
    (("latents", "on"), ("centercrop", "off")),
    (("latents", "on"), ("augment", "on")),
    (("textcache", "on"), ("te", "on")),
}

# What trainer.strategy fsdp refuses at start over two processes, naming the key (the first rule it meets). The
# rows train in one process, where fsdp has nothing to shard, so the strategy is no factor: one test checks each
# of these levels, over the rows' own values, and that the default row shards.
FSDP_REFUSED: dict[tuple[str, str], str] = {
    ("ema", "on"): "ema.enabled",
    ("te", "on"): "train_text_encoder",
    ("fused", "on"): "optimizer.fused_backward",
    ("bf16w", "on"): "weights_dtype",
    ("locon", "on"): "network.type",
    ("base", "nf4"): "network.type",  # nf4 storage needs an adapter
    ("swap", "on"): "memory.blocks_on_cpu",
    ("compile", "on"): "compile",
}

ROW_STEPS = 2
ROW_CLASS_IMAGES = 2
ROW_RESOLUTION = 64
EMBEDDING_TOKEN = "tinystyle"
AUGMENT = [{"name": "hflip", "p": 0.5}, {"name": "rotate", "degrees": 8.0, "p": 1.0},
           {"name": "color_jitter", "p": 1.0}]


def _shared_options(row: dict[str, str], on: dict[str, bool], prompt: str, cache_dir: Path) -> dict:
    """The overrides of the tiny demo preset that both matrices' rows set alike: ROW_STEPS steps with one
    sampling round and one checkpoint at the last, and the options the two share."""
    return {
        "trainer.max_steps": ROW_STEPS, "trainer.max_epochs": None,
        "sampling.interval_steps": ROW_STEPS, "sampling.batch_size": 1,
        "sampling.concepts": [{"prompt": prompt, "negative_prompt": "", "steps": 2, "cfg_scale": 3.0,
                               "num_samples": 1, "seed": 7, "width": ROW_RESOLUTION, "height": ROW_RESOLUTION}],
        "data.resolution": ROW_RESOLUTION,
        "checkpoint.every_n_train_steps": ROW_STEPS,
        "data.concepts[0].instance_set.prompt": prompt,
        "cache": {"latents": on["latents"], "text_embeddings": on["textcache"], "dir": str(cache_dir)},
        "aspect_ratio_bucket.enabled": on["buckets"],
        "ema": {"enabled": on["ema"], "use_for_samples": on["ema"]},
        "optimizer.fused_backward": on["fused"],
        "trainer.accumulate_grad_batches": int(row["accum"]),
        "weights_dtype": "bf16" if on["bf16w"] else "fp32",
        "base_dtype": row["base"],
        "trainer.precision": row["precision"] if row["precision"] == "bf16" else int(row["precision"]),
        "trainer.gradient_clip_val": 1.0 if on["gradclip"] else None,
        "uncond": {"enabled": on["uncond"], "p": 0.5},
        "memory": {"blocks_on_cpu": 1 if on["swap"] else 0, "offload_activations": on["offload"]},
        "gradient_checkpointing": on["offload"],
        "compile": on["compile"],
    }


def row_values(row: dict[str, str], output_dir: Path, class_dir: Path, existing_class_dir: Path,
               embedding_file: Path, cache_dir: Path) -> dict:
    """The tiny demo preset with one row's options, trained for ROW_STEPS steps with one sampling round at
    the last step and one checkpoint."""
    on = {name: level == "on" for name, level in row.items()}
    prompt = f"sks toy {EMBEDDING_TOKEN}" if on["ti"] else "sks toy"
    values = tiny_config(output_dir, **{
        **_shared_options(row, on, prompt, cache_dir),
        "model": ROW_MODELS[row["model"]],
        "clip_stop_at_layer": int(row["clip"]),
        "data.center_crop": on["centercrop"],
        # Flux.1's sides are multiples of 16: a step of 64 / 4
        "aspect_ratio_bucket.c_div": 4 if row["model"] == "flux" else 8,
        "train_text_encoder": on["te"],
        "min_snr_gamma": 5.0 if on["minsnr"] else None,
        "noise_offset": 0.05 if on["noiseoffset"] else 0.0,
        "augment": copy.deepcopy(AUGMENT) if on["augment"] else [],
        "custom_embeddings": {"enabled": on["ti"], "path": str(embedding_file)},
        "network": ({"type": "lora", "rank": 4, "alpha": 4.0, "conv_rank": 2, "conv_alpha": 2.0} if on["locon"]
                    else {"type": "lora", "rank": 4, "alpha": 4.0}
                    if row["base"] == "nf4" or (on["swap"] and not on["fused"]) else {"type": "full"}),
    })
    class_set = values["data"]["concepts"][0]["class_set"]
    # The class set stays in the config with prior preservation off, as users leave it: nothing is generated.
    values["prior_preservation"]["enabled"] = row["prior"] != "off"
    class_set["path"] = str(existing_class_dir if row["prior"] == "existing" else class_dir)
    class_set["auto_generate"].update(enabled=row["prior"] != "existing", num_target=ROW_CLASS_IMAGES, steps=2,
                                     batch_size=2)
    return values


# -- the flow-matching transformer families' option rows ------------------------------------------------------

# The families after Flux.1 with the options a flow-matching transformer takes. What none of them has (CLIP
# skip, textual inversion, DDPM loss weights, convolutions, a trained text encoder) stays out of these rows;
# FAMILY_REFUSED checks Flux.1's refusals of the same keys.
FLOW_FACTORS: dict[str, list[str]] = {
    "model": ["qwen-image", "chroma", "z-image", "flux2-klein", "qwen-image-edit"],
    "network": ["lora", "lokr", "full"],   # network.type
    "base": ["fp32", "fp8", "nf4"],        # base_dtype
    "precision": ["32", "bf16"],           # trainer.precision
    "prior": ["off", "gen"],               # prior preservation with class images the family's pipeline renders
    "latents": ["off", "on"],              # cache.latents (every row crops at the centre, without augmentation)
    "textcache": ["off", "on"],            # cache.text_embeddings
    "buckets": ["off", "on"],              # aspect_ratio_bucket.enabled
    "ema": ["off", "on"],                  # ema.enabled, and samples drawn with the averaged weights
    "fused": ["off", "on"],                # optimizer.fused_backward
    "accum": ["1", "2"],                   # trainer.accumulate_grad_batches
    "bf16w": ["off", "on"],                # weights_dtype: bf16
    "gradclip": ["off", "on"],             # trainer.gradient_clip_val
    "uncond": ["off", "on"],               # uncond.enabled
    "weighting": ["none", "cosmap"],       # flow.weighting
    "val": ["off", "on"],                  # validation on a held-out split at the last step
    "swap": ["off", "on"],                 # memory.blocks_on_cpu: 1
    "offload": ["off", "on"],              # memory.offload_activations, with gradient_checkpointing
    "compile": ["off", "on"],              # compile: the transformer's repeated blocks and the VAE encoder
}
FLOW_ROW_MODELS = {"qwen-image": "demo:tiny-qwen-image", "chroma": "demo:tiny-chroma", "z-image": "demo:tiny-z-image",
                   "flux2-klein": "demo:tiny-flux2-klein", "qwen-image-edit": "demo:tiny-qwen-image-edit"}
# What the edit model refuses at start, naming the key: class images have no control images, and its prompts are
# read with the control images, so they are not cached. Rows avoid these pairs, and one test checks each refusal.
FLOW_FAMILY_REFUSED: dict[Pair, str] = {
    (("model", "qwen-image-edit"), ("prior", "gen")): "data.concepts[0].class_set",
    (("model", "qwen-image-edit"), ("textcache", "on")): "cache.text_embeddings",
}
# the sample data's (control, target) pairs with their instructions, which an edit model trains on
EDIT_PAIRS = "demo:sample-data/edit"


def flow_row_values(row: dict[str, str], output_dir: Path, class_dir: Path, cache_dir: Path) -> dict:
    """The tiny demo preset on one flow family's stand-in with one row's options, trained for ROW_STEPS steps
    with one sampling round, one validation round (when on) and one checkpoint at the last step."""
    on = {name: level == "on" for name, level in row.items()}
    values = tiny_config(output_dir, **{
        **_shared_options(row, on, "sks toy", cache_dir),
        "model": FLOW_ROW_MODELS[row["model"]],
        "data.center_crop": True,
        "aspect_ratio_bucket.c_div": 4,  # the families' sides are multiples of 16: a step of 64 / 4
        "flow.weighting": row["weighting"],
        "validation": ({"every_n_steps": ROW_STEPS, "split": 0.2, "timesteps": [300, 700]} if on["val"]
                       else {"every_n_steps": 0, "split": 0.0}),
        "network": {"type": row["network"], "rank": 4, "alpha": 4.0},
    })
    values["prior_preservation"]["enabled"] = row["prior"] != "off"
    class_set = values["data"]["concepts"][0]["class_set"]
    class_set["path"] = str(class_dir)
    class_set["auto_generate"].update(enabled=True, num_target=ROW_CLASS_IMAGES, steps=2, batch_size=2)
    if row["model"] == "qwen-image-edit":
        values["data"]["concepts"][0]["instance_set"].update(path=EDIT_PAIRS, prompt="{TXT_PROMPT}")
        if row["prior"] == "off":
            values["data"]["concepts"][0]["class_set"] = None
        values["sampling"]["concepts"][0]["control_image"] = f"{EDIT_PAIRS}/pair_00.control.png"
    return values


def refused_pairs(factors: dict[str, list[str]], values_for: Callable[[dict], dict]) -> dict[Pair, str]:
    """Pairs of levels that the config loader refuses when set together over default levels, with its
    message."""
    defaults = {name: levels[0] for name, levels in factors.items()}
    refused = {}
    for pair in sorted(all_pairs(factors)):
        (a, x), (b, y) = pair
        if x == factors[a][0] or y == factors[b][0]:
            continue  # a level on its own is checked by the rows, which all load
        try:
            cfg.from_dict(values_for({**defaults, a: x, b: y}))
        except cfg.ConfigError as error:
            refused[pair] = str(error)
    return refused


# -- shipped presets on the tiny model ------------------------------------------------------------------------

PRESET_STEPS = 3
PRESET_CLASS_IMAGES = 4
PRESET_MAX_SAMPLES = 2


# the stand-in of each shipped architecture a preset names (SD1.x and SD2.x presets train demo:tiny-sd)
TINY_MODELS = {"sdxl": "demo:tiny-sdxl", "flux1-dev": "demo:tiny-flux", "flux1-schnell": "demo:tiny-flux-schnell",
               "chroma": "demo:tiny-chroma", "z-image": "demo:tiny-z-image", "qwen-image": "demo:tiny-qwen-image",
               "qwen-image-edit": "demo:tiny-qwen-image-edit", "flux2-klein-4b": "demo:tiny-flux2-klein",
               "flux2-klein-9b": "demo:tiny-flux2-klein"}
# the architectures that edit a control image, which train on EDIT_PAIRS
EDIT_ARCHITECTURES = ("qwen-image-edit",)


def preset_to_tiny(preset: Path, output_dir: Path, class_root: Path, captioned_path: str) -> cfg.Config:
    """Load a shipped preset with engine.config and rewrite only what cannot run on a CPU in a test.

    Changed, and nothing else:
    - model -> demo:tiny-sd, or demo:tiny-sdxl for an SDXL preset, demo:tiny-flux for a Flux.1 one,
      demo:tiny-chroma for a Chroma one; demo:tiny-z-image for a Z-Image one; demo:tiny-qwen-image for a
      Qwen-Image one; demo:tiny-qwen-image-edit for a Qwen-Image-Edit one; demo:tiny-flux2-klein for a FLUX.2
      [klein] one; vae, tokenizer and the text-encoder files -> null (the tiny model's own);
    - every concept's instance_set.path -> demo:sample-data/instance, or `captioned_path` (images with .txt
      captions) when its prompt is '{TXT_PROMPT}', or for an edit model EDIT_PAIRS (and instance_set.control_path
      -> "": the controls lie beside their targets);
    - every class_set.path -> class_root/<concept index>, an empty folder, so class images are generated;
      auto_generate keeps its settings except num_target -> PRESET_CLASS_IMAGES and steps -> 2;
    - data.resolution -> 64;
    - trainer.max_steps -> PRESET_STEPS and trainer.max_epochs -> null;
    - sampling.interval_steps -> PRESET_STEPS (one round, at the last step); for each sampling prompt
      width/height -> 64, steps -> 2, num_samples -> at most PRESET_MAX_SAMPLES;
    - checkpoint.every_n_train_steps -> PRESET_STEPS (one checkpoint, at the last step);
    - output_dir -> output_dir; num_workers -> 0;
    - memory.blocks_on_cpu -> at most the tiny model's repeated blocks (all of them when the preset swaps more).
    Precision, accelerator, optimizer (8-bit included), caches, batch size, bucketing, CLIP skip and the
    memory switches stay as the preset sets them: the engine falls back on a CPU as it does for users.
    """
    values = cfg.to_dict(cfg.load(preset))
    architecture = guess_architecture(values["model"])
    tiny = TINY_MODELS.get(architecture, "demo:tiny-sd")
    values.update(model=tiny, vae=None, tokenizer=None, text_encoder=None, text_encoder_2=None,
                  output_dir=str(output_dir), num_workers=0)
    values["data"]["resolution"] = 64
    for index, concept in enumerate(values["data"]["concepts"]):
        instance = concept["instance_set"]
        if architecture in EDIT_ARCHITECTURES:
            instance.update(path=EDIT_PAIRS, control_path="")
        else:
            instance["path"] = (captioned_path if "{TXT_PROMPT}" in instance["prompt"]
                                else "demo:sample-data/instance")
        if concept.get("class_set"):
            concept["class_set"]["path"] = str(class_root / str(index))
            concept["class_set"]["auto_generate"].update(num_target=PRESET_CLASS_IMAGES, steps=2)
    values["trainer"].update(max_steps=PRESET_STEPS, max_epochs=None)
    values["sampling"]["interval_steps"] = PRESET_STEPS
    for prompt in values["sampling"]["concepts"]:
        prompt.update(width=64, height=64, steps=2, num_samples=min(prompt["num_samples"], PRESET_MAX_SAMPLES))
    values["checkpoint"]["every_n_train_steps"] = PRESET_STEPS
    if values["memory"]["blocks_on_cpu"]:
        from engine import memory_plan

        blocks = memory_plan.repeated_block_count(cfg.from_dict(values))
        values["memory"]["blocks_on_cpu"] = min(values["memory"]["blocks_on_cpu"], blocks)
    return cfg.from_dict(values)


# -- reading a run --------------------------------------------------------------------------------------------

def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def changed_elements(base_file: Path, trained_file: Path) -> int:
    """How many weights differ between a base model file and a checkpoint's, compared in the checkpoint's
    dtype (bf16 weights are rounded from the base before training, which alone is no change). A grown
    tensor (token embeddings with textual-inversion tokens added) is compared on the base's part."""
    from safetensors.torch import load_file

    base, trained = load_file(base_file), load_file(trained_file)
    assert base.keys() == trained.keys()
    changed = 0
    for key, before in base.items():
        after = trained[key][tuple(slice(0, n) for n in before.shape)]
        assert after.shape == before.shape, key
        changed += int((before.to(after.dtype) != after).sum())
    return changed


def tensor_dtypes(value) -> list:
    """The dtype of every tensor inside nested dicts and lists (an optimizer's saved state)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value.dtype]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [dtype for item in items for dtype in tensor_dtypes(item)]


def messages(log: list, text: str, level: Optional[str] = None) -> list[str]:
    return [e.message for e in log if text in e.message and (level is None or e.level == level)]


def combinations_of(factors: dict[str, list[str]]) -> int:
    return math.prod(len(levels) for levels in factors.values())
