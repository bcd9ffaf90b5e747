"""Converting an adapter run, each file judged by a reader that is not the engine's: diffusers'
load_lora_weights for the kohya/LyCORIS and diffusers LoRA files, diffusers' single-file loader for the
merged model. The reference is the engine's adapted model, rebuilt from the checkpoint's peft weights."""
import contextlib
import logging
import warnings
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from engine import checkpoints
from engine import config as cfg
from engine.errors import UserError
from engine.models.convert import DIFFUSERS_WEIGHTS, convert_checkpoint
from engine.testing import tiny_config

TOLERANCE = 1e-4  # the same function computed along two code paths in fp32
CHANGED = 1e-3    # what the adapter must move the output by, so that equality means something


def train_adapter_run(output_dir: Path, network: str, **overrides) -> Path:
    """A two-step adapter run of the tiny model over UNet and text encoder, with LoCon convolutions; the
    high learning rate without warmup moves the adapter well away from its identity start."""
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "trainer.max_steps": 2, "sampling.interval_steps": 0, "checkpoint.every_n_train_steps": 2,
        "network.type": network, "network.rank": 4, "network.alpha": 2, "network.conv_rank": 2,
        "network.conv_alpha": 1, "train_text_encoder": True, "optimizer.params.lr": 1e-2,
        "optimizer.lr_scheduler.warmup.enabled": False,
        "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})
    trainer = Trainer(cfg.from_dict(values))
    trainer.run()
    return Path(trainer.run_dir)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, class_images):
    return train_adapter_run(tmp_path_factory.mktemp("lora"), "lora")


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, tiny_model, class_images):
    return train_adapter_run(tmp_path_factory.mktemp("dora"), "dora")


@pytest.fixture(scope="module")
def loha_run(tmp_path_factory, tiny_model, class_images):
    return train_adapter_run(tmp_path_factory.mktemp("loha"), "loha")


RUNS = {"lora": "lora_run", "dora": "dora_run", "loha": "loha_run"}


# -- the reference: the engine's own adapted models --------------------------------------------------------
def base_models(tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval(),
            "text_encoder": CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()}


def adapted_models(run: Path, tiny_model):
    return with_run_adapters(run, base_models(tiny_model))


def with_run_adapters(run: Path, models: dict) -> dict:
    """The base models with the adapters of the run's newest checkpoint loaded into them."""
    from engine.models.adapters import add_adapter, load_adapter_folder
    from engine.run_dir import RunDir

    network = cfg.load(RunDir(run).config).network
    checkpoint = checkpoints.latest_checkpoint(run)
    for component, model in models.items():
        add_adapter(model, component, network, 0)
        load_adapter_folder(model, checkpoint / component, "test")
        model.eval()
    return models


def unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    latents = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    conditioning = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), conditioning).sample


def text_output(text_encoder):
    ids = torch.tensor([[49406, 320, 1929, 539, 518, 2368, 49407] + [49407] * 70])
    ids = ids.clamp(max=text_encoder.config.vocab_size - 1)
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def assert_same_outputs(expected: dict, unet, text_encoder, base: dict):
    """unet and text_encoder compute what the engine's adapted models do, and the adapter changed both."""
    for name, output, model in (("unet", unet_output, unet), ("text_encoder", text_output, text_encoder)):
        want, got, untouched = output(expected[name]), output(model), output(base[name])
        assert (want - untouched).abs().max().item() > CHANGED, f"the {name}'s adapter changes nothing"
        assert (got - want).abs().max().item() <= TOLERANCE, name


# -- diffusers as the reader ---------------------------------------------------------------------------------
@contextlib.contextmanager
def library_messages():
    """Every warning diffusers, transformers and peft give meanwhile, through logging or warnings."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)  # the test session quiets transformers to errors
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(str(w.message) for w in caught)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def pipeline(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


def tuner_modules(model) -> set[str]:
    """Names of the modules a peft adapter wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def file_tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def load_lora(tiny_model, path):
    pipe = pipeline(tiny_model)
    with library_messages() as messages:
        pipe.load_lora_weights(str(path))
    key_problems = [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]
    assert not key_problems, key_problems
    return pipe


def kohya_names(model, prefix: str) -> set[str]:
    # kohya's naming, written out here rather than taken from the engine: the module path with dots as
    # underscores; the text encoder's under text_model. as CLIPTextModel nested it.
    names = tuner_modules(model)
    if prefix == "lora_te_":
        names = {"text_model." + name.removeprefix("text_model.") for name in names}
    return {prefix + name.replace(".", "_") for name in names}


# -- the files -------------------------------------------------------------------------------------------------
def test_kohya_file_loads_into_every_module_and_computes_the_adapted_models(lora_run, tiny_model, tmp_path):
    written = convert_checkpoint(lora_run, tmp_path)
    assert written.parent == tmp_path and written.name.endswith("-lora.safetensors")
    tensors, metadata = file_tensors(written)
    # the same weights and training record as the file the run wrote beside its checkpoint
    trainer_tensors, trainer_metadata = file_tensors(checkpoints.latest_checkpoint(lora_run) / "adapter.safetensors")
    assert metadata == trainer_metadata and metadata["ss_network_module"] == "networks.lora"
    assert tensors.keys() == trainer_tensors.keys()
    assert all(torch.equal(tensors[k], trainer_tensors[k]) for k in tensors)

    pipe = load_lora(tiny_model, written)
    modules = {key.split(".")[0] for key in tensors}
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    text_modules = modules - unet_modules
    # LoCon: the ResNet convolutions are adapted too, and every module in the file was wrapped
    assert any("resnets" in m for m in unet_modules) and text_modules
    assert len(tuner_modules(pipe.unet)) == len(unet_modules)
    assert len(tuner_modules(pipe.text_encoder)) == len(text_modules)
    assert kohya_names(pipe.unet, "lora_unet_") == unet_modules
    assert kohya_names(pipe.text_encoder, "lora_te_") == text_modules
    assert_same_outputs(adapted_models(lora_run, tiny_model), pipe.unet, pipe.text_encoder, base_models(tiny_model))


@pytest.mark.parametrize("network", ["lora", "dora", "loha"])
def test_merged_single_file_computes_the_adapted_models(network, request, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = request.getfixturevalue(RUNS[network])
    written = convert_checkpoint(run, tmp_path, adapter_output="merged")
    assert written.name == f"{run.name}-{checkpoints.latest_checkpoint(run).name}.safetensors"
    tensors, _ = file_tensors(written)
    assert {k.split(".")[0] for k in tensors} == {"model", "first_stage_model", "cond_stage_model"}
    assert not any("lora" in k or "hada" in k or "magnitude" in k for k in tensors)
    loaded = StableDiffusionPipeline.from_single_file(str(written), config=str(tiny_model), local_files_only=True,
                                                      safety_checker=None, feature_extractor=None)
    assert_same_outputs(adapted_models(run, tiny_model), loaded.unet, loaded.text_encoder, base_models(tiny_model))


@pytest.mark.parametrize("network", ["lora", "dora"])
def test_diffusers_layout_loads_into_every_module_and_computes_the_adapted_models(network, request, tiny_model,
                                                                                tmp_path):
    import json

    run = request.getfixturevalue(RUNS[network])
    written = convert_checkpoint(run, tmp_path, fmt="diffusers")
    assert written.name == DIFFUSERS_WEIGHTS and written.parent.name.endswith(f"-{network}-diffusers")
    tensors, metadata = file_tensors(written)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder"}
    # the scale alpha / rank travels in the LoraConfig diffusers reads (without it, alpha = rank)
    configs = json.loads(metadata["lora_adapter_metadata"])
    assert (configs["unet.r"], configs["unet.lora_alpha"], configs["unet.use_dora"]) == (4, 2, network == "dora")

    pipe = load_lora(tiny_model, written.parent)  # a folder: diffusers finds pytorch_lora_weights.safetensors
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        modules = {k.removeprefix(component + ".").split(".lora_")[0] for k in tensors if k.startswith(component)}
        # (the text encoder's under text_model. in the file, whichever nesting the installed CLIPTextModel has)
        flat = {m.removeprefix("text_model.") for m in tuner_modules(model)}
        assert flat == {m.removeprefix("text_model.") for m in modules}, component
    assert_same_outputs(adapted_models(run, tiny_model), pipe.unet, pipe.text_encoder, base_models(tiny_model))


def test_adapter_options_reach_the_adapter_file(lora_run, tmp_path):
    half = convert_checkpoint(lora_run, tmp_path / "half.safetensors", unet_dtype="fp16", text_encoder_dtype="bf16")
    tensors, _ = file_tensors(half)
    assert {t.dtype for k, t in tensors.items() if k.startswith("lora_unet_")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.startswith("lora_te_")} == {torch.bfloat16}
    unet_only = convert_checkpoint(lora_run, tmp_path / "unet-only", fmt="diffusers", text_encoder=False)
    tensors, metadata = file_tensors(unet_only)
    assert tensors and all(k.startswith("unet.") for k in tensors) and "text_encoder.r" not in metadata
    # The command line's --merge, from a checkpoint folder, with the model file's own options.
    merged = tmp_path / "merged.ckpt"
    result = run_cli("convert", str(checkpoints.latest_checkpoint(lora_run)), str(merged), "--merge", "--no-vae",
                     "--no-text-encoder", "--unet-dtype", "fp16")
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(merged, map_location="cpu", weights_only=True)["state_dict"]
    assert state and {t.dtype for t in state.values()} == {torch.float16}
    assert all(k.startswith("model.diffusion_model.") for k in state)
    assert not any("lora" in k for k in state)


def test_what_cannot_be_written_is_refused_naming_the_flag(lora_run, loha_run, tiny_model, tmp_path):
    out = tmp_path / "out"
    refused = [
        (lora_run, dict(adapter_output="merged", fmt="diffusers"), "--merge"),
        (lora_run, dict(fmt="ckpt"), "--format ckpt"),
        (lora_run, dict(ema=True), "--ema"),
        (lora_run, dict(vae_dtype="fp16"), "--vae-dtype"),
        (loha_run, dict(fmt="diffusers"), "--format diffusers"),
        (tiny_model, dict(adapter_output="merged"), "--merge"),      # a model folder has no adapter
        (tiny_model, dict(fmt="diffusers"), "--format diffusers"),
        (lora_run, dict(adapter_output="lycoris"), "adapter output"),
    ]
    for source, options, flag in refused:
        with pytest.raises(UserError, match="^" + flag):
            convert_checkpoint(source, out, **options)
    with pytest.raises(UserError, match="a .ckpt is written only with --merge"):
        convert_checkpoint(lora_run, tmp_path / "adapter.ckpt")
    assert not out.exists() and not (tmp_path / "adapter.ckpt").exists()

    # The command line: one line naming the flag, exit status 2, nothing written.
    result = run_cli("convert", str(lora_run), str(out), "--merge", "--format", "diffusers")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: --merge") and "--format diffusers" in result.stderr
    assert not out.exists()


def test_ema_writes_the_average_of_the_adapter(tmp_path, tiny_model, class_images):
    from engine.ema import ADAPTER_EMA_FILE, EMA_FOLDER

    run = train_adapter_run(tmp_path / "run", "lora", **{"ema.enabled": True, "ema.decay": 0.5,
                                                        "train_text_encoder": False})
    checkpoint = checkpoints.latest_checkpoint(run)
    raw = convert_checkpoint(checkpoint, tmp_path / "raw.safetensors")
    averaged = convert_checkpoint(checkpoint, tmp_path / "ema.safetensors", ema=True)
    (raw_state, _), (ema_state, _) = file_tensors(raw), file_tensors(averaged)
    assert raw_state.keys() == ema_state.keys()
    # the average of two steps lags the weights: every trained tensor differs, the alphas do not
    shadow = torch.load(checkpoint / EMA_FOLDER / ADAPTER_EMA_FILE, weights_only=False)["shadow_params"]
    ups = [k for k in raw_state if k.endswith("lora_up.weight")]
    assert all(not torch.equal(raw_state[k], ema_state[k]) for k in ups)
    assert all(torch.equal(raw_state[k], ema_state[k]) for k in raw_state if k.endswith(".alpha"))
    assert sum(t.numel() for t in shadow) == sum(t.numel() for k, t in ema_state.items() if not k.endswith("alpha"))
