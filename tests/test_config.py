"""The config schema: the seed's YAML loads, overrides apply, mistakes are named."""
import re
import warnings

import pytest

from conftest import ROOT
from engine import config as cfg

SEED_CONFIG = """
model: path/to/diffusers/model
vae: null
tokenizer: null
output_dir: output
project: SCAL-SDT
batch_size: 2
seed: 114514
num_workers: null
train_text_encoder: false
gradient_checkpointing: false
xformers: true
clip_stop_at_layer: 2
pad_tokens: true
data:
  resolution: 512
  center_crop: false
  concepts:
    - instance_set: {path: data/instance, prompt: 'sks 1girl'}
      class_set:
        path: data/class
        prompt: '1girl'
        auto_generate: {enabled: true, negative_prompt: 'lowres, ...', steps: 28, cfg_scale: 11, num_target: 100, batch_size: 1}
sampling:
  interval_steps: 50
  batch_size: 1
  concepts:
    - {prompt: 'sks 1girl, sitting', negative_prompt: 'lowres, ...', steps: 28, cfg_scale: 11, num_samples: 8, seed: 114514, width: 512, height: 512}
checkpoint:
  every_n_epochs: 10
  save_top_k: 5
  filename: '{epoch}-{train_loss:.2f}'
trainer: {accelerator: gpu, devices: -1, auto_select_gpus: true, precision: 16, log_every_n_steps: 1, max_epochs: 100}
prior_preservation: {enabled: true, prior_loss_weight: 1.0}
aspect_ratio_bucket: {enabled: false, debug: false}
ema: {enabled: false, decay: 0.995}
uncond: {enabled: false, p: 0.1, cond: zeros}
loggers:
  wandb: {sample: true}
optimizer:
  name: bitsandbytes.optim.AdamW8bit
  params: {lr: 2e-6, beta1: 0.9, beta2: 0.999, weight_decay: 2e-1, eps: 1e-7}
  lr_scale: {enabled: true, method: sqrt}
  lr_scheduler:
    name: torch.optim.lr_scheduler.CosineAnnealingLR
    params: {T_max: 100, eta_min: 2e-7, last_epoch: -1}
    warmup: {enabled: true, init_lr: 1e-8, steps: 50, strategy: linear}
"""


def test_the_seed_template_loads_with_warnings_for_lightning_keys(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_CONFIG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = cfg.load(path)
    messages = [str(w.message) for w in caught]
    assert any("trainer.auto_select_gpus" in m for m in messages)
    assert any("checkpoint.filename" in m for m in messages)
    assert config.optimizer.params.lr == pytest.approx(2e-6)  # YAML reads 2e-6 as a string
    assert config.optimizer.params.weight_decay == pytest.approx(0.2)
    assert config.trainer.precision == 16 and config.trainer.devices == -1
    assert config.data.concepts[0].class_set.auto_generate.cfg_scale == 11.0
    assert config.sampling.concepts[0].num_samples == 8
    assert config.clip_stop_at_layer == 2 and config.xformers is True
    assert config.loggers.wandb == {"sample": True}


def test_overrides_set_nested_and_listed_keys():
    base = cfg.default_dict()
    base.update(model="m", data={"concepts": [{"instance_set": {"path": "i", "prompt": "p"},
                                               "class_set": {"path": "c", "prompt": "q"}}]})
    config = cfg.load(base=base, overrides=["trainer.max_steps=7", "data.concepts[0].instance_set.prompt=sks dog",
                                            "optimizer.params.lr=1e-4", "ema.enabled=true"])
    assert config.trainer.max_steps == 7
    assert config.data.concepts[0].instance_set.prompt == "sks dog"
    assert config.optimizer.params.lr == pytest.approx(1e-4)
    assert config.ema.enabled is True


@pytest.mark.parametrize("values, message", [
    ({"data": {"resolutoin": 512}}, "unknown config key 'data.resolutoin' (allowed here: resolution,"),
    ({"batch_size": "2"}, "config key 'batch_size': expected an integer, got '2'"),
    ({"uncond": {"cond": "ones"}}, "config key 'uncond.cond': expected one of 'zeros', 'bos', 'eos', got 'ones'"),
    ({"trainer": {"max_epochs": None, "max_steps": None}}, "set at least one"),
    ({"data": {"concepts": [{"instance_set": {"path": "x"}}]}}, "data.concepts[0].class_set.path"),
])
def test_mistakes_name_the_key_and_what_was_expected(values, message):
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict(values)
    assert message in str(error.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\ndata: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        cfg.load(path)


def test_presets_load_and_describe_themselves():
    presets = sorted((ROOT / "presets").glob("*.yaml"))
    names = {p.stem for p in presets}
    assert {"tiny-demo-cpu", "dreambooth-10gb", "dreambooth-24gb", "native-finetune"} <= names
    for preset in presets:
        config = cfg.load(preset)
        assert config.description and "\n" not in config.description


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z0-9_.\[\]]+)` \|", readme, flags=re.MULTILINE))
    assert documented == set(cfg.iter_keys())


@pytest.mark.parametrize("override, message", [
    ("data.concepts.instance_set.path=x", "config key 'data.concepts.instance_set.path': 'data.concepts' is not a mapping"),
    ("data.concepts[x].path=1", "--set: 'data.concepts[x].path' is not a key path"),
    ("model.x=1", "config key 'model.x': 'model' is not a mapping"),
    ("=3", "--set: '' is not a key path"),
    ("data.concepts[3].instance_set.path=x", "'data.concepts' has no list item 3"),
])
def test_malformed_overrides_name_the_key(override, message):
    base = cfg.default_dict()
    base["model"] = "m"
    with pytest.raises(cfg.ConfigError) as error:
        cfg.load(base=base, overrides=[override])
    assert message in str(error.value)


@pytest.mark.parametrize("values, message", [
    ({"sampling": {"batch_size": 0}}, "config key 'sampling.batch_size': must be at least 1"),
    ({"trainer": {"log_every_n_steps": 0}}, "config key 'trainer.log_every_n_steps': must be at least 1"),
    ({"trainer": {"max_epochs": -1}}, "config key 'trainer.max_epochs': must be at least 1"),
    ({"checkpoint": {"every_n_train_steps": 0}}, "config key 'checkpoint.every_n_train_steps': must be at least 1"),
    ({"checkpoint": {"save_top_k": -2}}, "config key 'checkpoint.save_top_k'"),
    ({"optimizer": {"fused_backward": True}, "trainer": {"precision": 16}}, "use precision bf16"),
])
def test_values_that_would_hang_or_crash_are_refused(values, message):
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict(values)
    assert message in str(error.value)


def test_editor_text_errors_carry_the_line():
    with pytest.raises(cfg.ConfigError, match=r"^YAML syntax error at line 3, column 1"):
        cfg.parse_yaml("model: x\ndata: [oops\n")
    with pytest.raises(cfg.ConfigError, match="must be a mapping"):
        cfg.parse_yaml("- a list\n")
