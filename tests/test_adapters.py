"""LoRA-family adapters: the kohya file against diffusers' loader and against ComfyUI's formulas as its source
has them (tests/client_formulas.py), exact resume (after SIGKILL and in two gloo processes), init_from, and
refusals."""
import io
import logging

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from client_formulas import comfyui_weight
from conftest import kill_at_checkpoint, run_cli, run_torchrun, train_here
from engine import checkpoints, events
from engine import config as cfg
from engine.testing import tiny_config

# A high rate and no warmup, so that two steps move the adapter far from its zero start.
LOCON = {"network.type": "lora", "network.rank": 4, "network.alpha": 2.0, "network.conv_rank": 2,
         "network.conv_alpha": 1.0, "train_text_encoder": True, "optimizer.params.lr": 1e-2,
         "optimizer.lr_scheduler.warmup.enabled": False, "sampling.interval_steps": 0,
         "data.concepts[0].class_set.auto_generate.enabled": False}


def adapter_values(output_dir, **overrides):
    return tiny_config(output_dir, **{**LOCON, "trainer.max_steps": 2, "checkpoint.every_n_train_steps": 2,
                                      **overrides})


def train(values):
    from engine.train import Trainer

    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    return trainer.run_dir, checkpoints.latest_checkpoint(trainer.run_dir)


@pytest.fixture(scope="module")
def locon_run(tmp_path_factory, class_images):
    output = tmp_path_factory.mktemp("locon")
    run_dir, checkpoint = train(adapter_values(output))
    return cfg.load(run_dir / "config.yaml"), checkpoint


def base_models(tiny_model, checkpoint):
    """The tiny model's components that the checkpoint holds an adapter for."""
    from engine.models.sd import load_components

    components = load_components(str(tiny_model))
    return {name: getattr(components, name) for name in ("unet", "text_encoder") if (checkpoint / name).is_dir()}


def adapted_models(tiny_model, config, checkpoint):
    """The trained models rebuilt by the engine: base weights, adapter layers, the checkpoint's weights."""
    from engine.models.adapters import add_adapter, load_adapter_folder

    models = base_models(tiny_model, checkpoint)
    for name, model in models.items():
        add_adapter(model, name, config.network, 0)
        load_adapter_folder(model, checkpoint / name, "test")
        model.eval()
    return models


def probe(models, seed=0):
    """UNet and text-encoder outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 77), generator=generator)
    latents, timesteps = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500])
    with torch.no_grad():
        text = models["text_encoder"](ids).last_hidden_state
        return models["unet"](latents, timesteps, text).sample, text


def file_modules(path):
    with safe_open(str(path), "pt") as handle:
        return {key.partition(".")[0] for key in handle.keys()}, handle.metadata()


def test_the_kohya_file_loads_in_diffusers_with_every_module_and_the_trained_outputs(tiny_model, locon_run):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    config, checkpoint = locon_run
    path = checkpoint / "adapter.safetensors"
    modules, metadata = file_modules(path)
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    text_modules = {m for m in modules if m.startswith("lora_te_text_model_encoder_layers_")}
    assert unet_modules | text_modules == modules
    # kohya's choice: every Linear/1x1 conv of the transformer blocks, the ResNet blocks and samplers (LoCon)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in unet_modules
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in unet_modules
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in text_modules
    state = load_file(path)
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"],
            metadata["ss_base_model_version"], metadata["ss_steps"]) == ("networks.lora", "4", "2.0", "sd_v1", "2")

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        base = probe({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder})
        pipeline.load_lora_weights(str(path))
    finally:
        logging.getLogger().removeHandler(handler)
    assert "unexpected" not in logs.getvalue().lower() and "missing keys" not in logs.getvalue().lower()
    wrapped = {name: sum(isinstance(m, BaseTunerLayer) for m in model.modules())
               for name, model in (("unet", pipeline.unet), ("text_encoder", pipeline.text_encoder))}
    assert wrapped == {"unet": len(unet_modules), "text_encoder": len(text_modules)}

    loaded = probe({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder})
    trained = probe(adapted_models(tiny_model, config, checkpoint))
    for mine, theirs, before in zip(trained, loaded, base):
        assert (mine - theirs).abs().max().item() <= 1e-4
        assert (mine - before).abs().max().item() > 1e-3  # the adapter really changes the output


def test_an_adapter_checkpoint_holds_only_the_adapter(locon_run):
    _, checkpoint = locon_run
    assert sorted(p.name for p in (checkpoint / "unet").iterdir()) == ["adapter_model.safetensors"]
    weights = load_file(checkpoint / "unet" / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert checkpoints.read_meta(checkpoint)["network"] == "lora"


# ComfyUI's weight and the trained one agree to this fraction of the module's largest weight: the same fp32
# arithmetic in another order.
FORMULA_TOLERANCE = 1e-5


def base_and_trained_weights(models, network):
    """{file module name: (base weight, trained weight)} of every adapted module, the trained one as peft merges
    the adapter into it (the models' adapters are merged)."""
    from engine.models.adapters import target_modules
    from engine.models.kohya import module_names

    weights = {}
    for component, model in models.items():
        targets = target_modules(model, component, network)
        for module, name in module_names(models, component, targets).items():
            layer = model.get_submodule(module)
            base = layer.get_base_layer().weight.detach().clone()
            layer.merge()
            weights[name] = (base, layer.get_base_layer().weight.detach().clone())
    return weights


def assert_comfyui_gives_the_trained_weights(path, models, network):
    """ComfyUI's formulas, over the base weights with the file's tensors, give every module its trained weight,
    read every tensor of the file, and the adapter moved the weights well beyond the tolerance."""
    state = load_file(path)
    weights = base_and_trained_weights(models, network)
    read, moved = set(), 0.0
    for name, (base, trained) in weights.items():
        patched, keys = comfyui_weight(state, name, base)
        read |= keys
        scale = trained.abs().max().item()
        assert (patched - trained).abs().max().item() <= FORMULA_TOLERANCE * scale, name
        moved = max(moved, (trained - base).abs().max().item() / scale)
    assert read == set(state)
    assert moved > 100 * FORMULA_TOLERANCE


def assert_reads_back_as_trained(state, checkpoint, tiny_model, values):
    """The file read back as network.init_from reads it gives the adapter of the checkpoint."""
    from engine.models.adapters import adapter_state, add_adapter
    from engine.models.kohya import from_kohya

    config = cfg.from_dict(values)
    models = base_models(tiny_model, checkpoint)
    for name, model in models.items():
        add_adapter(model, name, config.network, 1)  # other initial weights than the run's
    from_kohya(state, models, config, "network.init_from")
    for name, model in models.items():
        trained, read = load_file(checkpoint / name / "adapter_model.safetensors"), adapter_state(model)
        assert read.keys() == trained.keys()
        for key in trained:
            # a DoRA magnitude comes back through a ratio of norms and its inverse: fp32 rounding of its size
            assert (read[key] - trained[key]).abs().max().item() <= 1e-6 * max(1.0, trained[key].abs().max().item())


def test_a_locon_file_gives_comfyui_the_trained_weights(tiny_model, locon_run):
    config, checkpoint = locon_run
    assert_comfyui_gives_the_trained_weights(checkpoint / "adapter.safetensors",
                                             adapted_models(tiny_model, config, checkpoint), config.network)


@pytest.mark.parametrize("network", ["loha", "lokr"])
def test_loha_and_lokr_files_give_comfyui_the_trained_weights_and_read_back(tiny_model, class_images, tmp_path,
                                                                           network):
    values = adapter_values(tmp_path, **{"network.type": network, "network.conv_rank": 0,
                                         "train_text_encoder": False, "trainer.max_steps": 3,
                                         "checkpoint.every_n_train_steps": 3})
    run_dir, checkpoint = train(values)
    config = cfg.load(run_dir / "config.yaml")
    path = checkpoint / "adapter.safetensors"
    assert_comfyui_gives_the_trained_weights(path, adapted_models(tiny_model, config, checkpoint), config.network)
    assert_reads_back_as_trained(load_file(path), checkpoint, tiny_model, values)


def test_a_dora_file_gives_comfyui_the_trained_weights_says_where_not_and_reads_back(tiny_model, class_images,
                                                                                    tmp_path):
    from engine.models.convert import convert_checkpoint
    from engine.models.kohya import DORA_NOTE
    from scal_gui import convert_options
    from scal_gui.actions import Actions
    from scal_gui.jobs import JobManager
    from scal_gui.tab_convert import convert_and_report

    # DoRA over 3x3 convolutions (LoCon), 1x1 ones and Linear layers of the UNet and the text encoder
    values = adapter_values(tmp_path, **{"network.type": "dora", "trainer.max_steps": 3,
                                         "checkpoint.every_n_train_steps": 3})
    run_dir, checkpoint = train(values)
    config = cfg.load(run_dir / "config.yaml")
    path = checkpoint / "adapter.safetensors"
    state = load_file(path)
    # one scale per output channel, laid out as kohya/LyCORIS do: ComfyUI tells the axis from the first one
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (32, 1, 1, 1)
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"].shape == (32, 1, 1, 1)
    assert state["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"].shape[1:] == (1,)
    assert_comfyui_gives_the_trained_weights(path, adapted_models(tiny_model, config, checkpoint), config.network)
    _, metadata = file_modules(path)
    assert metadata["ss_training_comment"] == f"SCAL-SDT. {DORA_NOTE}"
    assert_reads_back_as_trained(state, checkpoint, tiny_model, values)

    # The converter writes the same file and warns, on the command line and in the Convert tab.
    warnings = []

    def collect(event):
        if event.kind == "log" and event.level == "warning":
            warnings.append(event.message)

    written = convert_checkpoint(checkpoint, tmp_path / "dora.safetensors", on_event=collect)
    converted, converted_metadata = load_file(written), file_modules(written)[1]
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    assert converted_metadata == metadata and warnings == [DORA_NOTE]
    form = [value for value, _ in convert_options.defaults().values()]
    report = convert_and_report(Actions(JobManager()), str(checkpoint), str(tmp_path / "tab.safetensors"), form,
                                progress=lambda *args, **kwargs: None)
    assert report.startswith("Wrote `") and report.endswith("\n\n" + DORA_NOTE)


def test_resume_after_sigkill_equals_an_uninterrupted_adapter_run(tmp_path, class_images):
    values = {**LOCON, "trainer.max_steps": 8, "checkpoint.every_n_train_steps": 3, "optimizer.params.lr": 1e-3}
    train_here(tiny_config(tmp_path / "reference", **values))
    killed = tmp_path / "b.yaml"
    killed.write_text(yaml.safe_dump(tiny_config(tmp_path / "killed", **values)))
    kill_at_checkpoint(killed, "step-00000003")
    (run_dir,) = (tmp_path / "killed" / "tiny-demo").iterdir()
    assert run_cli("train", "--resume", str(run_dir)).returncode == 0
    (reference_run,) = (tmp_path / "reference" / "tiny-demo").iterdir()
    for component in ("unet", "text_encoder"):
        expected = load_file(checkpoints.latest_checkpoint(reference_run) / component / "adapter_model.safetensors")
        actual = load_file(checkpoints.latest_checkpoint(run_dir) / component / "adapter_model.safetensors")
        assert expected.keys() == actual.keys()
        assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6


def test_two_gloo_ranks_train_the_adapter_as_one_process_with_the_same_global_batch(tmp_path, class_images):
    # Adam's first steps move every weight by about the rate, whatever the gradient's size: a low rate keeps
    # the float differences of summing the batch in two processes small
    values = {**LOCON, "trainer.max_steps": 2, "checkpoint.every_n_train_steps": 2, "optimizer.params.lr": 1e-4}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path / "ddp", batch_size=1, **values)))
    train_here(tiny_config(tmp_path / "single", batch_size=2, **values))
    result = run_torchrun(2, "--config", str(tmp_path / "ddp.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [next((tmp_path / name / "tiny-demo").iterdir()) for name in ("single", "ddp")]
    for component in ("unet", "text_encoder"):
        expected, actual = (load_file(checkpoints.latest_checkpoint(run) / component / "adapter_model.safetensors")
                            for run in runs)
        assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-5


def test_init_from_continues_from_the_file_and_refuses_another_rank(tmp_path, class_images, locon_run):
    config, checkpoint = locon_run
    file = str(checkpoint / "adapter.safetensors")
    # a rate too small to move anything: the run ends with the file's weights
    run_dir, continued = train(adapter_values(tmp_path / "continued", **{"network.init_from": file,
                                                                          "optimizer.params.lr": 1e-12,
                                                                          "trainer.max_steps": 1,
                                                                          "checkpoint.every_n_train_steps": 1}))
    expected, actual = load_file(file), load_file(continued / "adapter.safetensors")
    assert expected.keys() == actual.keys()
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6

    from engine.train import Trainer

    wrong = Trainer(cfg.from_dict(adapter_values(tmp_path / "wrong", **{"network.init_from": file,
                                                                        "network.rank": 8}))).run()
    assert isinstance(wrong, events.Failed) and wrong.user_error
    assert wrong.error.startswith("config key 'network.init_from': the adapter does not fit")


@pytest.mark.parametrize("key,value,message", [
    ("network.rank", 0, "config key 'network.rank': must be a whole number of at least 1"),
    ("network.rank", 2.5, "config key 'network.rank': expected an integer"),
    ("network.type", "lorax", "config key 'network.type': expected one of 'full', 'lora'"),
    ("network.dropout", 1.0, "config key 'network.dropout': must be within [0, 1)"),
    ("network.conv_alpha", 0.0, "config key 'network.conv_alpha': must be positive"),
    ("network.type", "full", None),  # with the modulation option below
])
def test_network_mistakes_are_refused_with_the_key(tmp_path, key, value, message):
    extra = {} if message else {"network.modulation": True}
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict(adapter_values(tmp_path, **{key: value, **extra}))
    assert str(error.value).startswith(message or "config key 'network.modulation': chooses what an adapter")


def test_the_ema_of_an_adapter_follows_its_weights_and_resumes(tmp_path, class_images):
    from engine.ema import ADAPTER_EMA_FILE, EMA_FOLDER
    from engine.train import Trainer

    values = adapter_values(tmp_path, **{"ema.enabled": True, "ema.decay": 0.5, "trainer.max_steps": 2,
                                         "checkpoint.every_n_train_steps": 1, "train_text_encoder": False})
    run_dir, _ = train(values)
    first, second = checkpoints.list_checkpoints(run_dir)
    raw = [load_file(c / "unet" / "adapter_model.safetensors") for c in (first, second)]
    averages = [torch.load(c / EMA_FOLDER / ADAPTER_EMA_FILE, weights_only=False) for c in (first, second)]
    # diffusers' EMAModel copies the weights at its first update, then decays by min(decay, k / (9 + k))
    zero_start = next(i for i, k in enumerate(raw[0]) if ".lora_B." in k)
    key = list(raw[0])[zero_start]
    shadow = [state["shadow_params"][zero_start] for state in averages]
    assert torch.equal(shadow[0], raw[0][key])
    assert torch.allclose(shadow[1], (2 / 11) * shadow[0] + (9 / 11) * raw[1][key], atol=1e-7)
    assert (shadow[1] - raw[1][key]).abs().max().item() > 1e-6  # the average lags the weights

    resumed = Trainer.for_resume(str(run_dir), overrides=["trainer.max_steps=3"])
    assert isinstance(resumed.run(), events.Finished)
    state = torch.load(checkpoints.latest_checkpoint(run_dir) / EMA_FOLDER / ADAPTER_EMA_FILE, weights_only=False)
    assert state["optimization_step"] == 3


@pytest.mark.parametrize("fused", [False, True])
def test_an_adapter_over_a_bf16_base_trains_in_fp32(tmp_path, class_images, fused):
    run_dir, checkpoint = train(adapter_values(tmp_path, **{"weights_dtype": "bf16", "trainer.precision": "bf16",
                                                            "optimizer.fused_backward": fused,
                                                            "train_text_encoder": False}))
    adapter = load_file(checkpoint / "unet" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    ups = [t for k, t in adapter.items() if ".lora_B." in k]
    assert all(torch.isfinite(t).all() for t in ups) and max(t.abs().max().item() for t in ups) > 0


def test_samples_render_with_the_adapter_and_class_images_come_from_the_base_model(tmp_path, tiny_model):
    import numpy as np
    from PIL import Image

    from engine.classgen import ClassGenJob

    def class_folder(name):
        return {"data.concepts[0].class_set.path": str(tmp_path / name),
                "data.concepts[0].class_set.auto_generate": {"enabled": True, "num_target": 2, "steps": 2,
                                                             "cfg_scale": 3.0, "batch_size": 2}}

    # class images generated inside an adapter run equal those of the base model alone
    run_dir, _ = train(adapter_values(tmp_path / "run", **class_folder("in-run"), **{"sampling.interval_steps": 2}))
    base_only = tiny_config(tmp_path / "base", **class_folder("base"))
    assert isinstance(ClassGenJob(cfg.from_dict(base_only)).run(), events.Finished)
    pixels = {name: [np.asarray(Image.open(p)) for p in sorted((tmp_path / name).rglob("*.png"))]
              for name in ("in-run", "base")}
    assert len(pixels["in-run"]) == 2 and all(np.array_equal(a, b) for a, b in zip(pixels["in-run"], pixels["base"]))

    # the run's sample differs from the base model's rendering of the same prompt, seed and size
    from engine.models.sd import StableDiffusion, load_components
    from engine.sampling import PromptEncoder, generate_samples

    config = cfg.load(run_dir / "config.yaml")
    components = load_components(str(tiny_model))
    family = StableDiffusion()
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder, config.clip_stop_at_layer)
    (base_sample, *_) = generate_samples(config, pipeline, encoder, tmp_path / "base-samples")
    trained_sample = sorted((run_dir / "samples" / "000002").glob("*.png"))[0]
    assert np.abs(np.asarray(Image.open(trained_sample), dtype=np.int16)
                  - np.asarray(Image.open(base_sample), dtype=np.int16)).max() > 0
