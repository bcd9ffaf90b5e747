"""Flux.1 files judged by their readers: the transformer's original (BFL) layout by diffusers' single-file
converter and ComfyUI's diffusers->BFL map, the kohya adapter file by ComfyUI's key map and weight formulas
(tests/client_formulas.py) and by diffusers' Flux LoRA loader, and the file read back as network.init_from.

diffusers' converters assume Flux.1's width (3072) for the single blocks; the tests that go through them use
a full-width model one block deep, the others a narrow one."""
from types import SimpleNamespace

import pytest
import torch

from client_formulas import comfyui_flux_lora_keys, comfyui_weight
from engine.config import Network
from engine.errors import UserError
from engine.models import keymap_flux
from engine.models.kohya import from_kohya, to_kohya
from engine.models.single_file import FLUX_PARTS, detect_family, load_flux_files, read_shapes
from test_adapter_convert import CHANGED, TOLERANCE, library_messages

# The modules a Flux run adapts (engine.models.adapters), in each kind of block.
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
# with network.modulation also each block's modulation layer (BFL's img_mod and txt_mod, a single block's
# modulation)
DOUBLE_MODULATION = ("norm1.linear", "norm1_context.linear")
SINGLE_MODULATION = ("norm.linear",)
# kohya's names of the modulation layers in the file (sd-scripts' and diffusers' kohya converter's)
MODULATION_NAMES = ("lora_unet_double_blocks_{}_img_mod_lin", "lora_unet_double_blocks_{}_txt_mod_lin",
                    "lora_unet_single_blocks_{}_modulation_lin")
WEIGHT_TOLERANCE = 1e-5
# The text widths are the tiny encoders' below (CLIP's a multiple of CLIP-L's 12 heads); 64 inputs are 2x2
# patches of 16 latent channels, as FLUX.1's.
NARROW = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
              axes_dims_rope=(2, 2, 4))
# Flux.1's width, the depth and the rest shrunk
FULL_WIDTH = dict(NARROW, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                  axes_dims_rope=(16, 56, 56))


def flux_model(seed: int = 0, dtype=torch.float32, **config):
    """A random FluxTransformer2DModel, each weight a stretch of one random sequence from its own random start:
    no two weights (nor two rows of one) alike, at a tenth of the cost of drawing half a billion numbers."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**NARROW, **config})
    return filled(model, seed, dtype)


def filled(model, seed: int = 0, dtype=torch.float32):
    """The model with each weight a stretch of one random sequence (see flux_model), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty((1 << 20) + 7, dtype=dtype).normal_(generator=generator) * 0.2  # a prime period

    def draw(shape: torch.Size) -> torch.Tensor:
        start = int(torch.randint(pool.numel(), (1,), generator=generator))
        return pool.roll(start).repeat(-(-shape.numel() // pool.numel()))[:shape.numel()].reshape(shape).clone()

    model.load_state_dict({key: draw(value.shape) for key, value in model.state_dict().items()}, assign=True)
    return model.eval()


def targets(model, modulation: bool = False) -> list[str]:
    double = {int(k.split(".")[1]) for k in model.state_dict() if k.startswith("transformer_blocks.")}
    single = {int(k.split(".")[1]) for k in model.state_dict() if k.startswith("single_transformer_blocks.")}
    double_modules = DOUBLE + (DOUBLE_MODULATION if modulation else ())
    single_modules = SINGLE + (SINGLE_MODULATION if modulation else ())
    return ([f"transformer_blocks.{i}.{m}" for i in sorted(double) for m in double_modules]
            + [f"single_transformer_blocks.{i}.{m}" for i in sorted(single) for m in single_modules])


def adapt(model, network: Network, seed: int = 1):
    """The model with the network's peft adapter on the modules a Flux run adapts, every adapter weight
    random (a trained adapter, not the identity it starts as)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    names = targets(model, network.modulation)
    common = dict(r=network.rank, target_modules=names)
    if network.type in ("lora", "dora"):
        config = LoraConfig(lora_alpha=network.alpha, use_dora=network.type == "dora", **common)
    elif network.type == "loha":
        config = LoHaConfig(alpha=network.alpha, **common)
    else:
        config = LoKrConfig(alpha=network.alpha, **common)
    inject_adapter_in_model(config, model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.empty(param.shape).normal_(generator=generator)
                param.copy_(param * (1 + 0.1 * noise) if "magnitude" in name else 0.3 * noise)
    return model.eval()


# each adapter type, then each with network.modulation
TYPES = ["lora", "dora", "loha", "lokr"]
TYPES_AND_MODULATION = [(t, False) for t in TYPES] + [(t, True) for t in TYPES]
TYPES_AND_MODULATION_IDS = TYPES + [f"{t}-modulation" for t in TYPES]


def settings(network_type: str, modulation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(network=Network(type=network_type, rank=4, alpha=2.0, modulation=modulation))


def merged(model):
    from engine.models.adapters import merge_adapter

    return merge_adapter(model)


def sizes(model) -> tuple[int, int, int]:
    config = model.config
    return (config.num_layers, config.num_single_layers, config.num_attention_heads * config.attention_head_dim)


def output(model, seed: int = 5):
    """The transformer on a fixed small input: 4 image tokens, 3 text tokens."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 4, config.in_channels, generator=generator)
    text = torch.randn(1, 3, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    image_ids = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        return model(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.tensor([0.4]), img_ids=image_ids, txt_ids=torch.zeros(3, 3),
                     guidance=torch.tensor([3.5]) if config.guidance_embeds else None).sample


# -- the transformer's original layout -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_width():
    return flux_model(dtype=torch.bfloat16, **FULL_WIDTH)


def test_original_layout_is_what_diffusers_converter_reads_back_bit_exact(full_width):
    model = full_width
    state = model.state_dict()
    original = keymap_flux.to_original(state)
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 3072, 3072)
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    back = keymap_flux.from_original({keymap_flux.PREFIX + k: v for k, v in original.items()})
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)
    again = keymap_flux.to_original(back)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_original_layout_of_any_width_is_comfyuis_diffusers_map():
    """ComfyUI's own diffusers->BFL map (slices, the swapped final modulation) puts every weight of a narrow
    model where to_original does."""
    model = flux_model()
    state = model.state_dict()
    original = keymap_flux.to_original(state)
    key_map = comfyui_flux_lora_keys(original, *sizes(model))
    for key, tensor in state.items():
        if not key.endswith(".weight") or f"transformer.{key[:-7]}" not in key_map:
            continue
        target = key_map[f"transformer.{key[:-7]}"]
        if isinstance(target, str):
            assert torch.equal(original[target.removeprefix("diffusion_model.")], tensor), key
        elif target[1] is None:
            assert torch.equal(target[2](original[target[0].removeprefix("diffusion_model.")]), tensor), key
        else:
            axis, offset, size = target[1]
            whole = original[target[0].removeprefix("diffusion_model.")]
            assert torch.equal(whole.narrow(axis, offset, size), tensor), key


def test_a_module_without_an_original_name_is_refused():
    state = dict(flux_model().state_dict())
    state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2, 2)
    with pytest.raises(UserError, match="attn.extra.weight"):
        keymap_flux.to_original(state)


@pytest.mark.parametrize("modulation", [False, True])
def test_a_flux_run_adapts_these_modules_and_the_modulation_layers_only_with_network_modulation(modulation):
    """What the tests here adapt is what the engine adapts (engine.models.adapters), the modulation layers
    only with network.modulation."""
    from engine.models.adapters import target_modules

    model = flux_model()
    found = target_modules(model, "unet", Network(type="lora", modulation=modulation))
    assert found == {name: False for name in targets(model, modulation)}
    assert ("single_transformer_blocks.1.norm.linear" in found) == modulation


# -- the kohya adapter file, through ComfyUI --------------------------------------------------------------------
def comfyui_patched(file: dict, original: dict, key_map: dict) -> tuple[dict, set]:
    """The original-layout weights as ComfyUI patches them with the file, and the file keys it read."""
    patched = {key: tensor.clone() for key, tensor in original.items()}
    loaded = set()
    for module in sorted({key.partition(".")[0] for key in file}):
        assert module in key_map, f"ComfyUI maps no Flux weight to {module}"
        target = key_map[module]
        key, axis_offset_size = (target, None) if isinstance(target, str) else target[:2]
        assert isinstance(target, str) or len(target) == 2, f"{module} targets a transformed weight"
        whole = patched[key.removeprefix("diffusion_model.")]
        view = whole.narrow(*axis_offset_size) if axis_offset_size else whole
        weight, read = comfyui_weight(file, module, view.clone())
        view.copy_(weight)
        loaded |= read
    return patched, loaded


@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_comfyui_loads_every_key_and_computes_the_adapted_weights(network_type, modulation):
    config = settings(network_type, modulation)
    model = adapt(flux_model(), config.network)
    file = to_kohya({"transformer": model}, config)
    names = {key.partition(".")[0] for key in file}
    modulation_names = {name.format(i) for name in MODULATION_NAMES for i in range(2)}
    assert (modulation_names & names) == (modulation_names if modulation else set())
    if network_type == "lokr":  # not fusable: the fused modules' parts apart, the others by original name
        assert "lora_transformer_transformer_blocks_0_attn_to_q" in names
        assert "lora_transformer_single_transformer_blocks_1_proj_mlp" in names
        assert "lora_unet_double_blocks_0_img_attn_proj" in names
    else:
        assert not any(name.startswith("lora_transformer_") for name in names)
        assert {"lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                "lora_unet_single_blocks_1_linear1", "lora_unet_single_blocks_0_linear2",
                "lora_unet_double_blocks_0_txt_mlp_2"} <= names
        assert float(file["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * 2.0
    base = keymap_flux.to_original(flux_model().state_dict())
    patched, loaded = comfyui_patched(file, base, comfyui_flux_lora_keys(base, *sizes(model)))
    assert loaded == set(file), f"ComfyUI leaves keys unloaded: {sorted(set(file) - loaded)[:3]}"
    want = keymap_flux.to_original(merged(model).state_dict())
    changed = max((want[key] - base[key]).abs().max().item() for key in want)
    assert changed > CHANGED
    for key in want:
        assert (patched[key] - want[key]).abs().max().item() <= WEIGHT_TOLERANCE, key


@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_file_reads_back_as_the_adapter_it_was_written_from(network_type, modulation):
    from engine.models.adapters import adapter_state

    config = settings(network_type, modulation)
    model = adapt(flux_model(), config.network, seed=1)
    file = to_kohya({"transformer": model}, config)
    fresh = adapt(flux_model(), config.network, seed=2)
    from_kohya(file, {"transformer": fresh}, config, "network.init_from")
    want, got = adapter_state(model), adapter_state(fresh)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


def test_a_fused_module_trained_as_one_is_refused():
    """kohya's own Flux trainer adapts qkv as one module: its update has no exact split into q, k and v."""
    config = settings("lora")
    file = to_kohya({"transformer": adapt(flux_model(), config.network)}, config)
    up = file["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    file["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = up + 0.01
    with pytest.raises(UserError, match="network.init_from.*img_attn_qkv.*fused"):
        from_kohya(file, {"transformer": adapt(flux_model(), config.network)}, config, "network.init_from")


def test_another_alpha_is_refused_naming_the_key():
    config = settings("lora")
    file = to_kohya({"transformer": adapt(flux_model(), config.network)}, config)
    other = SimpleNamespace(network=Network(type="lora", rank=4, alpha=1.0))
    with pytest.raises(UserError, match="network.init_from.*alpha"):
        from_kohya(file, {"transformer": adapt(flux_model(), other.network)}, other, "network.init_from")


# -- the kohya adapter file, through diffusers ---------------------------------------------------------------------
def diffusers_reads(file: dict, base):
    """The base transformer with the file loaded by diffusers' Flux LoRA loader, and every warning it gave."""
    from diffusers.loaders import FluxLoraLoaderMixin

    with library_messages() as messages:
        state, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(file), return_alphas=True)
        FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=base)
    return base, messages


@pytest.mark.parametrize("config, modulation", [(dict(num_single_layers=0), False),
                                                (dict(FULL_WIDTH, num_layers=0), False),
                                                (dict(num_single_layers=0), True),
                                                (dict(FULL_WIDTH, num_layers=0), True)],
                         ids=["double-blocks", "full-width-single-block", "double-blocks-modulation",
                              "full-width-single-block-modulation"])
def test_diffusers_loads_the_lora_file_into_every_module(config, modulation):
    network = settings("lora", modulation)
    model = adapt(flux_model(**config), network.network)
    file = to_kohya({"transformer": model}, network)
    loaded, messages = diffusers_reads(file, flux_model(**config))
    assert not messages, messages
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = {name for name, m in loaded.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == set(targets(model, modulation))
    want, base = output(model), output(flux_model(**config))
    assert (want - base).abs().max().item() > CHANGED
    assert (output(loaded) - want).abs().max().item() <= TOLERANCE


# -- FLUX.1 as ComfyUI users keep it ---------------------------------------------------------------------------
def save(path, tensors: dict):
    from safetensors.torch import save_file

    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path))
    return path


def tiny_clip(width: int = 24):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    return CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()


def tiny_t5(width: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(4)
    return T5EncoderModel(T5Config(vocab_size=1000, d_model=width, d_ff=2 * width, d_kv=8, num_heads=4, num_layers=2,
                                   feed_forward_proj="gated-gelu")).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    return AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def encoder_tensors(model) -> dict:
    """A text encoder as ComfyUI's clip_l/t5xxl files hold it: CLIP under text_model., T5's input embedding
    once, as shared.weight (the shared one it is)."""
    state = model.state_dict()
    if "shared.weight" in state:
        return {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    return {"text_model." + k: v for k, v in state.items()}


def comfyui_parts(models: dict) -> dict:
    """Each model's tensors as ComfyUI's files hold them: BFL's transformer and autoencoder layouts (the
    autoencoder by the engine's SD converter, whose VAE layout is the same LDM one), transformers' names
    (CLIP's under text_model.), for the text encoders among models."""
    from engine.models.keymap import VAE_PREFIX, vae_key_map
    from engine.models.keymap import to_original as ldm

    vae = models["vae"]
    return {"transformer": keymap_flux.to_original(models["transformer"].state_dict()),
            **{name: encoder_tensors(models[name]) for name in ("text_encoder", "text_encoder_2") if name in models},
            "vae": {k.removeprefix(VAE_PREFIX): v for k, v in
                    ldm(vae.state_dict(), vae_key_map(vae.config, vae.state_dict().keys())).items()}}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory, full_width):
    """FLUX.1 one block deep at full width (what diffusers' converter reads), in bf16 as users' files are,
    with tiny encoders and autoencoder: as separate files and as one ComfyUI checkpoint."""
    folder = tmp_path_factory.mktemp("flux-files")
    models = {"transformer": full_width, "text_encoder": tiny_clip(),
              "text_encoder_2": tiny_t5(), "vae": tiny_vae()}
    parts = comfyui_parts(models)
    files = {name: save(folder / f"{name}.safetensors", tensors) for name, tensors in parts.items()}
    files["all-in-one"] = save(folder / "all-in-one.safetensors", {
        FLUX_PARTS[name] + key: tensor for name, tensors in parts.items() for key, tensor in tensors.items()})
    return models, files


def assert_loaded(loaded: dict, models: dict):
    assert loaded.keys() == models.keys()
    for name, model in models.items():
        want, got = model.state_dict(), loaded[name].state_dict()
        assert got.keys() == want.keys(), name
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()) for k in want), name


def test_flux_files_are_recognised_with_and_without_the_checkpoint_prefix(flux_files):
    _, files = flux_files
    assert detect_family(read_shapes(files["transformer"])) == "flux1"
    assert detect_family(read_shapes(files["all-in-one"])) == "flux1"


def test_separate_files_and_one_checkpoint_load_as_the_models_written(flux_files):
    models, files = flux_files
    loaded = load_flux_files(files["transformer"], text_encoder=files["text_encoder"],
                             text_encoder_2=files["text_encoder_2"], vae=files["vae"])
    assert loaded["transformer"].config.guidance_embeds and loaded["transformer"].config.num_layers == 1
    assert_loaded(loaded, models)
    del loaded
    assert_loaded(load_flux_files(files["all-in-one"]), models)


@pytest.mark.parametrize("part, wrong, message", [
    ("text_encoder_2", lambda: tiny_t5(width=16), "text_encoder_2.*T5 encoder 16 wide.*T5-XXL"),
    ("text_encoder_2", lambda: tiny_clip(), "text_encoder_2.*not a T5 encoder"),
    ("text_encoder", lambda: tiny_t5(), "text_encoder'.*not a CLIP text encoder"),
    ("text_encoder", lambda: tiny_clip(width=36), "text_encoder'.*CLIP text encoder 36 wide.*CLIP ViT-L"),
], ids=["t5-of-another-width", "clip-as-t5", "t5-as-clip", "clip-of-another-width"])
def test_a_wrong_text_encoder_is_refused_naming_its_key(flux_files, tmp_path, part, wrong, message):
    _, files = flux_files
    wrong_file = save(tmp_path / "wrong.safetensors", encoder_tensors(wrong()))
    others = {"text_encoder": files["text_encoder"], "text_encoder_2": files["text_encoder_2"], "vae": files["vae"]}
    with pytest.raises(UserError, match=message):
        load_flux_files(files["transformer"], **{**others, part: wrong_file})


@pytest.mark.parametrize("missing", ["text_encoder", "text_encoder_2", "vae"])
def test_a_transformer_file_without_a_part_is_refused_naming_its_key(flux_files, missing):
    _, files = flux_files
    given = {name: files[name] for name in ("text_encoder", "text_encoder_2", "vae") if name != missing}
    with pytest.raises(UserError, match=f"config key '{missing}': transformer.safetensors holds no"):
        load_flux_files(files["transformer"], **given)


def test_an_sd_file_is_refused_as_a_flux_model(tmp_path):
    from engine.models.keymap import UNET_PREFIX

    sd = save(tmp_path / "sd.safetensors", {
        UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768)})
    with pytest.raises(UserError, match="config key 'model': sd.safetensors is an SD15 checkpoint"):
        load_flux_files(sd)


# -- converting FLUX.1 runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flux(demo_cache):
    from engine import paths

    return paths.demo_model_dir("flux")


def train_flux(output_dir, **overrides):
    """A two-step run of the tiny FLUX.1-dev at a learning rate that moves every adapter weight."""
    from engine import config as cfg
    from engine import events
    from engine.testing import tiny_config
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": "demo:tiny-flux", "trainer.max_steps": 2, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": 2, "optimizer.params.lr": 1e-2,
        "optimizer.lr_scheduler.warmup.enabled": False, "prior_preservation.enabled": False,
        "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    return next((output_dir / "tiny-demo").iterdir())


LORA_RUN = {"network.type": "lora", "network.rank": 4, "network.alpha": 2}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_flux):
    return train_flux(tmp_path_factory.mktemp("flux-lora"), **LORA_RUN)


def file_tensors(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_full_run_converts_to_the_file_diffusers_from_single_file_reads_bit_equal(full_width, tiny_flux, tmp_path):
    """A full fine-tune's transformer, as the trainer's checkpoint holds it (unet/), becomes one BFL-layout
    file without prefix (ComfyUI's diffusion_models/)."""
    import json

    from diffusers import FluxTransformer2DModel

    from engine.models.convert import convert_checkpoint

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    full_width.save_pretrained(checkpoint / "unet")
    (checkpoint / "meta.json").write_text(json.dumps({"step": 2, "epoch": 0, "base_model": str(tiny_flux),
                                                      "trained": ["unet"], "network": "full"}))
    written = convert_checkpoint(checkpoint, tmp_path / "out", unet_dtype="bf16")
    tensors, _ = file_tensors(written)
    assert "double_blocks.0.img_attn.qkv.weight" in tensors and "single_blocks.0.linear1.weight" in tensors
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    del tensors
    full_width.save_config(tmp_path / "configs" / "transformer")
    with library_messages() as messages:
        loaded = FluxTransformer2DModel.from_single_file(str(written), config=str(tmp_path / "configs"),
                                                         subfolder="transformer", local_files_only=True,
                                                         torch_dtype=torch.bfloat16)
    assert not [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not used"))]
    want, got = full_width.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[key], want[key]) for key in want)


def test_adapter_run_converts_to_its_kohya_file_and_to_the_merged_transformer(lora_run, tiny_flux, tmp_path):
    """The kohya file is the trainer's; the merged transformer is what ComfyUI computes from the base
    transformer and that file."""
    from diffusers import FluxTransformer2DModel

    from engine import checkpoints
    from engine.models.convert import convert_checkpoint

    kohya_file, metadata = file_tensors(convert_checkpoint(lora_run, tmp_path))
    trainer_file, _ = file_tensors(checkpoints.latest_checkpoint(lora_run) / "adapter.safetensors")
    assert kohya_file.keys() == trainer_file.keys()
    assert all(torch.equal(kohya_file[key], trainer_file[key]) for key in kohya_file)
    assert metadata["ss_base_model_version"] == "flux1"
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in kohya_file

    merged, _ = file_tensors(convert_checkpoint(lora_run, tmp_path, adapter_output="merged"))
    base = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    original = keymap_flux.to_original(base.state_dict())
    patched, loaded = comfyui_patched(kohya_file, original, comfyui_flux_lora_keys(original, *sizes(base)))
    assert loaded == set(kohya_file)
    assert merged.keys() == original.keys()
    assert max((merged[key] - original[key]).abs().max().item() for key in merged) > CHANGED
    for key in merged:
        assert (merged[key] - patched[key]).abs().max().item() <= WEIGHT_TOLERANCE, key


def test_kohya_file_reads_back_as_init_from(lora_run, tmp_path):
    """A run that starts from the file saves, after one step at learning rate 0 (the first of a warmup from
    0), the adapter it read."""
    from safetensors.torch import load_file

    from engine import checkpoints

    source = checkpoints.latest_checkpoint(lora_run)
    run = train_flux(tmp_path / "again", **LORA_RUN, **{
        "network.init_from": str(source / "adapter.safetensors"), "optimizer.lr_scheduler.warmup.enabled": True,
        "optimizer.lr_scheduler.warmup.init_lr": 0.0, "trainer.max_steps": 1, "checkpoint.every_n_train_steps": 1})
    want = load_file(str(source / "unet" / "adapter_model.safetensors"))
    got = load_file(str(checkpoints.latest_checkpoint(run) / "unet" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


def test_dora_run_in_diffusers_layout_is_what_diffusers_flux_pipeline_computes(tiny_flux, tmp_path):
    """diffusers' Flux loader drops a kohya file's dora_scale (with a warning), so a DoRA run reaches diffusers
    in diffusers' own layout (`--format diffusers`): the transformer's adapter behind `transformer.`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from engine.models.convert import convert_checkpoint, load_source

    run = train_flux(tmp_path / "dora", **{**LORA_RUN, "network.type": "dora"})
    written = convert_checkpoint(run, tmp_path / "out", fmt="diffusers")
    assert {key.split(".")[0] for key in file_tensors(written)[0]} == {"transformer"}
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    with library_messages() as messages:
        pipe.load_lora_weights(str(written.parent))
    # the one message: that the file has no text-encoder adapter, which is so
    assert all(m.startswith("No LoRA keys associated to CLIPTextModel") for m in messages), messages
    adapted = load_source(run, ("unet",), merge_adapters=False).models["unet"].eval()
    want = output(adapted)
    assert (want - output(FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer"))).abs().max() > CHANGED
    assert (output(pipe.transformer) - want).abs().max().item() <= TOLERANCE


def test_a_transformer_diffusers_cannot_read_is_refused_naming_the_model(flux_files, tmp_path):
    """diffusers' converter reads only FLUX.1's width: a narrower transformer is one line naming `model`."""
    _, files = flux_files
    narrow = save(tmp_path / "narrow.safetensors", keymap_flux.to_original(flux_model().state_dict()))
    with pytest.raises(UserError, match="config key 'model': narrow.safetensors is not a FLUX.1 transformer diffusers"):
        load_flux_files(narrow, text_encoder=files["text_encoder"], text_encoder_2=files["text_encoder_2"],
                        vae=files["vae"])
