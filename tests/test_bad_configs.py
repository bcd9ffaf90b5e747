"""A corpus of bad configs, each refused as the config loads with one line naming its key: numbers outside
their documented range, and YAML written to exhaust memory or the stack."""
import dataclasses
import json
import re
import subprocess
import sys
import typing

import pytest

from conftest import ROOT, run_cli
from engine import config as cfg


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """Each level lists the one before `width` times: width ** levels strings once anything walks the tree."""
    lines = ["optimizer:", "  lr_scheduler:", "    params:", f"      l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"      l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


DEPTH = 20_000
DEEP = "optimizer:\n  lr_scheduler:\n    params: " + "[" * DEPTH + "]" * DEPTH + "\n"
HUGE_SEED = 2**70  # torch's generators take 64 bits at most
ONE_CONCEPT = "data:\n  concepts:\n    - instance_set: {path: x}\n      class_set:\n        path: y\n"

# (what is wrong, the YAML text or the --set overrides, the key the one-line message names)
CASES = [
    ("a negative clip norm does not clip: it turns the step around", "trainer:\n  gradient_clip_val: -1\n",
     "trainer.gradient_clip_val"),
    ("a negative min-SNR gamma weights the loss negatively: gradient ascent", "min_snr_gamma: -5\n", "min_snr_gamma"),
    ("a seed past 64 bits crashes the first generator seeded with it", f"seed: {HUGE_SEED}\n", "seed"),
    ("a seed of 5000 digits is more than Python reads as an integer", "seed: " + "9" * 5000 + "\n", "seed"),
    ("a negative number of loader processes crashes the data loader", "num_workers: -1\n", "num_workers"),
    ("a CLIP skip deeper than the text encoder crashes at the first step", "clip_stop_at_layer: 100\n",
     "clip_stop_at_layer"),
    ("an infinite learning rate turns the weights into NaN", "optimizer:\n  params:\n    lr: .inf\n",
     "optimizer.params.lr"),
    ("beta1 above 1 makes Adam's moment grow without bound", "optimizer:\n  params:\n    beta1: 1.5\n",
     "optimizer.params.beta1"),
    ("a negative beta2", "optimizer:\n  params:\n    beta2: -0.1\n", "optimizer.params.beta2"),
    ("a negative weight decay grows the weights", "optimizer:\n  params:\n    weight_decay: -0.01\n",
     "optimizer.params.weight_decay"),
    ("a negative epsilon, written as YAML 1.1 reads it (a string)", "optimizer:\n  params:\n    eps: -1e-8\n",
     "optimizer.params.eps"),
    ("a negative warmup length", "optimizer:\n  lr_scheduler:\n    warmup:\n      steps: -5\n",
     "optimizer.lr_scheduler.warmup.steps"),
    ("a negative warmup start", "optimizer:\n  lr_scheduler:\n    warmup:\n      init_lr: -1e-4\n",
     "optimizer.lr_scheduler.warmup.init_lr"),
    ("an EMA decay above 1 diverges", "ema:\n  decay: 1.5\n", "ema.decay"),
    ("a tag dropout above 1 is no probability", "captions:\n  tag_dropout: 2\n", "captions.tag_dropout"),
    ("a negative number of kept tags", "captions:\n  keep_tokens: -1\n", "captions.keep_tokens"),
    ("an augmentation probability above 1", "augment:\n  - {name: hflip, p: 1.5}\n", "augment[0].p"),
    ("a rotation of two full turns", "augment:\n  - {name: rotate, degrees: 720}\n", "augment[0].degrees"),
    ("a brightness change beyond 1 can make the factor negative",
     "augment:\n  - {name: color_jitter, brightness: 3}\n", "augment[0].brightness"),
    ("a noise offset five times the noise", "noise_offset: 5\n", "noise_offset"),
    ("a project that climbs out of output_dir puts the run elsewhere", "project: ../../x\n", "project"),
    ("a project that is an absolute path", "project: /tmp/elsewhere\n", "project"),
    ("a negative text encoder learning rate, whatever network.type",
     "network:\n  text_encoder_lr: -1e-5\n", "network.text_encoder_lr"),
    ("a negative alpha flips the adapter's update, whatever network.type", "network:\n  alpha: -1\n",
     "network.alpha"),
    ("a negative validation seed crashes numpy's generator", "validation:\n  seed: -1\n", "validation.seed"),
    ("a sample seed past 64 bits", f"sampling:\n  concepts:\n    - {{prompt: a, seed: {HUGE_SEED}}}\n",
     "sampling.concepts[0].seed"),
    ("a negative sample guidance scale", "sampling:\n  concepts:\n    - {prompt: a, cfg_scale: -3}\n",
     "sampling.concepts[0].cfg_scale"),
    ("a sample a trillion pixels wide", "sampling:\n  concepts:\n    - {prompt: a, width: 1099511627776}\n",
     "sampling.concepts[0].width"),
    ("a class image guidance scale below 0", ONE_CONCEPT + "        auto_generate: {cfg_scale: -1}\n",
     "data.concepts[0].class_set.auto_generate.cfg_scale"),
    ("a training side of a trillion pixels", "data:\n  resolution: 1099511627776\n", "data.resolution"),
    ("a negative aspect error keeps no image", "aspect_ratio_bucket:\n  max_aspect_error: -1\n",
     "aspect_ratio_bucket.max_aspect_error"),
    ("buckets of no area", "aspect_ratio_bucket:\n  c_size: 0\n", "aspect_ratio_bucket.c_size"),
    ("bucket sides narrower than the resolution's own", "aspect_ratio_bucket:\n  c_dim: 0.5\n",
     "aspect_ratio_bucket.c_dim"),
    ("no bucket step", "aspect_ratio_bucket:\n  c_div: 0\n", "aspect_ratio_bucket.c_div"),
    ("manual buckets of no area", "aspect_ratio_bucket:\n  manual:\n    max_size: 0\n",
     "aspect_ratio_bucket.manual.max_size"),
    ("a manual bucket step below one latent pixel", "aspect_ratio_bucket:\n  manual:\n    divisor: 4\n",
     "aspect_ratio_bucket.manual.divisor"),
    ("a billion laughs: aliases nested nine deep, nine wide", billion_laughs(), "optimizer.lr_scheduler.params.l1[0]"),
    ("an alias through --set", ["optimizer.lr_scheduler.params=[&a [lol, lol], [*a, *a]]"],
     "optimizer.lr_scheduler.params[1][0]"),
    ("a negative loader count through --set", ["num_workers=-1"], "num_workers"),
    ("a negative min-SNR gamma through --set", ["min_snr_gamma=-5"], "min_snr_gamma"),
]
# The ones also run through `python -m engine train` (each run starts the CLI, so a few).
CLI_CASES = ["trainer.gradient_clip_val", "seed", "clip_stop_at_layer", "num_workers",
             "optimizer.lr_scheduler.params.l1[0]"]


def _ids(cases):
    return [re.sub(r"\W+", "-", description)[:60] for description, _, _ in cases]


def _message(error: cfg.ConfigError, path) -> str:
    """The message without the file name that YAML-level refusals start with."""
    return str(error).removeprefix(f"{path}: ")


@pytest.mark.parametrize("description, source, key", CASES, ids=_ids(CASES))
def test_a_bad_config_is_refused_naming_its_key(tmp_path, description, source, key):
    path = tmp_path / "c.yaml"
    if isinstance(source, list):
        path.write_text("")
        load = dict(path=path, overrides=source)
    else:
        path.write_text(source)
        load = dict(path=path)
    with pytest.raises(cfg.ConfigError) as error:
        cfg.load(**load)
    message = _message(error.value, path)
    assert message.startswith(f"config key '{key}': ") and "\n" not in message, message


@pytest.mark.parametrize("description, source, key", [c for c in CASES if c[2] in CLI_CASES],
                         ids=_ids([c for c in CASES if c[2] in CLI_CASES]))
def test_the_cli_refuses_a_bad_config_in_one_line(tmp_path, description, source, key):
    path = tmp_path / "c.yaml"
    args = ["train", "--config", str(path)]
    if isinstance(source, list):
        path.write_text("")
        args += [arg for text in source for arg in ("--set", text)]
    else:
        path.write_text(source)
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: config key '{key}': "), result.stderr[-2000:]


def _annotation(path: str):
    """The schema's type of a key path, without its Range."""
    node = cfg.Config
    for part in path.replace("[]", "").split("."):
        tp = typing.get_type_hints(node)[part]
        node = next((arg for arg in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(arg)), tp)
    return tp


def test_every_numeric_key_has_a_range_the_readme_shows():
    """Ranges live on the schema's fields; the README's range column shows each of them."""
    numeric = {path for path in cfg.iter_keys()
               if {int, float} & {_annotation(path), *typing.get_args(_annotation(path))}}
    ranges = cfg.ranges()
    # Not numbers but numbers or names: trainer.precision takes Lightning's spellings (32, "bf16-mixed"), and
    # trainer.devices a count or -1 for every GPU, which distributed.process_count checks.
    assert numeric - set(ranges) == {"trainer.precision", "trainer.devices"}
    rows = [line.split("|") for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")]
    shown = {cells[1].strip().strip("`"): cells[3].strip() for cells in rows if len(cells) == 6}
    assert {path: shown.get(path) for path in cfg.iter_keys()} == {
        path: str(ranges.get(path, "")) for path in cfg.iter_keys()}


def test_shipped_presets_sit_inside_every_range():
    for preset in sorted((ROOT / "presets").glob("*.yaml")):
        cfg.load(preset)


def test_deep_nesting_is_refused_in_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(DEEP)
    with pytest.raises(cfg.ConfigError, match=rf"^{re.escape(str(path))}: YAML nested more than \d+ levels deep "
                                              r"at line 3, column \d+"):
        cfg.load(path)
    with pytest.raises(cfg.ConfigError, match=r"^YAML nested more than"):
        cfg.load(overrides=["optimizer.lr_scheduler.params=" + "[" * DEPTH + "]" * DEPTH])
    result = run_cli("train", "--config", str(path), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: YAML nested more than"), result.stderr[-2000:]


# Loads the config as the CLI does, then writes it out as a run's config.yaml does, in a process whose
# address space is capped, so that a config that got through cannot take the machine's memory.
PROBE = """
import json, resource, sys, time
from engine import config
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cap = 2 * 1024**3
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
start = time.monotonic()
try:
    config.dump_yaml(config.load(sys.argv[1]))
    error = None
except config.ConfigError as refused:
    error = str(refused)
except MemoryError:
    error = "MemoryError"
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "seconds": time.monotonic() - start, "grown_mb": grown / 1024}))
"""


@pytest.mark.parametrize("text", [billion_laughs(), DEEP], ids=["billion-laughs", "deep"])
def test_hostile_yaml_is_refused_fast_in_little_memory(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-c", PROBE, str(path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout)
    assert outcome["error"] and outcome["error"] != "MemoryError", outcome
    assert outcome["seconds"] < 5 and outcome["grown_mb"] < 100, outcome


def test_the_app_reads_its_editor_text_through_the_same_loader():
    from scal_gui import configs

    for text in (billion_laughs(), DEEP):
        with pytest.raises(cfg.ConfigError):
            configs.parse_yaml(text)


def test_the_corpus_size():
    assert len(CASES) >= 40
