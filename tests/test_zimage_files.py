"""Z-Image adapter files judged by their readers: the kohya/LyCORIS file by ComfyUI's key map and weight formulas
(tests/client_formulas.py) and by diffusers' Z-Image LoRA loader, and the file read back as network.init_from.
The transformer is a narrow one, two blocks deep."""
from types import SimpleNamespace

import pytest
import torch

from client_formulas import comfyui_weight, comfyui_zimage_lora_keys
from conftest import lora_checkpoint_over_files
from engine.config import Network
from engine.models.kohya import from_kohya, to_kohya
from test_adapter_convert import CHANGED, TOLERANCE, library_messages

# The modules a Z-Image run adapts in each main block (engine.models.adapters), and with network.modulation
MAIN_BLOCK = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
              "feed_forward.w2", "feed_forward.w3")
MODULATION = ("adaLN_modulation.0",)
WEIGHT_TOLERANCE = 1e-5
NARROW = dict(dim=32, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, axes_dims=[4, 6, 6], cap_feat_dim=16)
TYPES = ["lora", "dora", "loha", "lokr"]
TYPES_AND_MODULATION = [(t, False) for t in TYPES] + [(t, True) for t in TYPES]
TYPES_AND_MODULATION_IDS = TYPES + [f"{t}-modulation" for t in TYPES]


def zimage_model(seed: int = 0):
    """A narrow ZImageTransformer2DModel with every weight random (its pad tokens and zero-initialised layers
    included)."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**NARROW)
    generator = torch.Generator().manual_seed(seed)
    model.load_state_dict({key: 0.2 * torch.randn(value.shape, generator=generator)
                           for key, value in model.state_dict().items()})
    return model.eval()


def targets(model, modulation: bool = False) -> list[str]:
    return [f"layers.{i}.{m}" for i in range(model.config.n_layers)
            for m in MAIN_BLOCK + (MODULATION if modulation else ())]


def adapt(model, network: Network, seed: int = 1):
    """The model with the network's peft adapter on the modules a Z-Image run adapts, every adapter weight random
    (a trained adapter, not the identity it starts as)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    common = dict(r=network.rank, target_modules=targets(model, network.modulation))
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


def settings(network_type: str, modulation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(network=Network(type=network_type, rank=4, alpha=2.0, modulation=modulation))


def merged(model):
    from engine.models.adapters import merge_adapter

    return merge_adapter(model)


def output(model, seed: int = 5):
    """The transformer on a fixed small input: a 4x4 latent (4 tokens), 3 caption tokens."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(16, 1, 4, 4, generator=generator)
    caption = torch.randn(3, NARROW["cap_feat_dim"], generator=generator)
    with torch.no_grad():
        return model([latent], torch.tensor([0.4]), [caption], return_dict=False)[0][0]


@pytest.mark.parametrize("modulation", [False, True])
def test_a_zimage_run_adapts_the_main_blocks_and_their_modulation_only_with_network_modulation(modulation):
    from engine.models.adapters import target_modules

    model = zimage_model()
    found = target_modules(model, "unet", Network(type="lora", modulation=modulation))
    assert found == {name: False for name in targets(model, modulation)}


# -- the kohya adapter file, through ComfyUI --------------------------------------------------------------------
def file_modules(file: dict) -> set[str]:
    """The module names of a file's keys: each key less its tensor name (LoRA's two factors hold a dot)."""
    names = set()
    for key in file:
        for factor in (".lora_down.weight", ".lora_up.weight"):
            if key.endswith(factor):
                names.add(key[:-len(factor)])
                break
        else:
            names.add(key.rpartition(".")[0])
    return names


def comfyui_layout(state: dict, key_map: dict) -> dict:
    """The adapted layers' weights in ComfyUI's layout (q, k and v in one qkv), from diffusers' state dict."""
    out = {}
    for name, target in key_map.items():
        if not name.startswith("transformer.") or name[len("transformer."):] + ".weight" not in state:
            continue
        weight = state[name[len("transformer."):] + ".weight"]
        if isinstance(target, str):
            out[target] = weight.clone()
            continue
        key, (axis, offset, size) = target
        whole = out.setdefault(key, torch.zeros(3 * size, weight.shape[1]))
        whole.narrow(axis, offset, size).copy_(weight)
    return out


@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_comfyui_loads_every_key_and_computes_the_adapted_weights(network_type, modulation):
    config = settings(network_type, modulation)
    model = adapt(zimage_model(), config.network)
    file = to_kohya({"unet": model}, config)
    names = file_modules(file)
    assert names == {f"diffusion_model.{name}" for name in targets(model, modulation)}
    key_map = comfyui_zimage_lora_keys(NARROW["n_layers"], NARROW["dim"], NARROW["n_refiner_layers"])
    base = comfyui_layout(zimage_model().state_dict(), key_map)
    patched = {key: tensor.clone() for key, tensor in base.items()}
    loaded = set()
    for module in sorted(names):
        assert module in key_map, f"ComfyUI maps no Z-Image weight to {module}"
        target = key_map[module]
        key, axis_offset_size = (target, None) if isinstance(target, str) else target
        view = patched[key].narrow(*axis_offset_size) if axis_offset_size else patched[key]
        weight, read = comfyui_weight(file, module, view.clone())
        view.copy_(weight)
        loaded |= read
    assert loaded == set(file), f"ComfyUI leaves keys unloaded: {sorted(set(file) - loaded)[:3]}"
    want = comfyui_layout(merged(model).state_dict(), key_map)
    assert max((want[key] - base[key]).abs().max().item() for key in want) > CHANGED
    for key in want:
        assert (patched[key] - want[key]).abs().max().item() <= WEIGHT_TOLERANCE, key


@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_file_reads_back_as_the_adapter_it_was_written_from(network_type, modulation):
    from engine.models.adapters import adapter_state

    config = settings(network_type, modulation)
    model = adapt(zimage_model(), config.network, seed=1)
    file = to_kohya({"unet": model}, config)
    fresh = adapt(zimage_model(), config.network, seed=2)
    from_kohya(file, {"unet": fresh}, config, "network.init_from")
    want, got = adapter_state(model), adapter_state(fresh)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


# -- the kohya adapter file, through diffusers ---------------------------------------------------------------------
@pytest.mark.parametrize("modulation", [False, True])
def test_diffusers_loads_the_lora_file_into_every_module(modulation):
    from diffusers.loaders import ZImageLoraLoaderMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = settings("lora", modulation)
    model = adapt(zimage_model(), config.network)
    file = to_kohya({"unet": model}, config)
    loaded = zimage_model()
    with library_messages() as messages:
        state = ZImageLoraLoaderMixin.lora_state_dict(dict(file))
        ZImageLoraLoaderMixin.load_lora_into_transformer(state, transformer=loaded)
    assert not messages, messages
    adapted = {name for name, m in loaded.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == set(targets(model, modulation))
    want, base = output(merged(adapt(zimage_model(), config.network))), output(zimage_model())
    assert (want - base).abs().max().item() > CHANGED
    assert (output(loaded) - want).abs().max().item() <= TOLERANCE


# -- the transformer's original layout, and Z-Image as ComfyUI users keep it -------------------------------------
def test_original_layout_is_what_diffusers_converter_reads_back_bit_exact():
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from engine.models import keymap_zimage

    state = zimage_model().state_dict()
    original = keymap_zimage.to_original(state)
    assert "layers.1.attention.qkv.weight" in original and "final_layer.linear.weight" in original
    assert keymap_zimage.from_original(original).keys() == state.keys()
    read = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert read.keys() == state.keys()
    assert all(torch.equal(read[key], state[key]) for key in state)
    # every adapted layer's weight is where ComfyUI's map puts it
    key_map = comfyui_zimage_lora_keys(NARROW["n_layers"], NARROW["dim"], NARROW["n_refiner_layers"])
    targets_in_comfyui = {(t if isinstance(t, str) else t[0]).removeprefix("diffusion_model.")
                          for name, t in key_map.items() if name.startswith("transformer.")
                          and name[len("transformer."):] + ".weight" in state}
    assert targets_in_comfyui <= original.keys()


def _save(path, tensors: dict):
    from safetensors.torch import save_file

    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def zimage_files(tmp_path_factory, demo_cache):
    """The tiny Z-Image converted to its transformer file, with its Qwen3 and autoencoder as ComfyUI's files
    hold them (Qwen3 under model., the autoencoder in the LDM layout)."""
    from diffusers import AutoencoderKL
    from transformers import Qwen3Model

    from engine import paths
    from engine.models.convert import convert_checkpoint
    from engine.models.keymap import VAE_PREFIX, to_original, vae_key_map

    tiny = paths.demo_model_dir("z-image")
    folder = tmp_path_factory.mktemp("zimage-files")
    transformer = convert_checkpoint(tiny, folder / "z_image.safetensors")
    qwen = Qwen3Model.from_pretrained(tiny / "text_encoder")
    vae = AutoencoderKL.from_pretrained(tiny / "vae")
    qwen_file = _save(folder / "qwen_3_4b.safetensors", {"model." + k: v for k, v in qwen.state_dict().items()})
    vae_file = _save(folder / "ae.safetensors", {k.removeprefix(VAE_PREFIX): v for k, v in to_original(
        vae.state_dict(), vae_key_map(vae.config, vae.state_dict().keys())).items()})
    return tiny, transformer, qwen_file, vae_file


def test_a_model_folder_converts_to_the_transformer_file_comfyui_and_diffusers_read(zimage_files):
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import load_file

    tiny, transformer, _, _ = zimage_files
    want = ZImageTransformer2DModel.from_pretrained(tiny / "transformer").state_dict()
    file = load_file(str(transformer))
    assert not any(key.startswith(("all_", "diffusion_model.")) for key in file)  # ComfyUI's bare layout
    read = ZImageTransformer2DModel.from_single_file(str(transformer), config=str(tiny), subfolder="transformer")
    assert read.state_dict().keys() == want.keys()
    assert all(torch.equal(read.state_dict()[key], want[key]) for key in want)


def test_the_transformer_file_with_qwen3s_and_the_autoencoders_files_loads_for_training(zimage_files):
    from engine.models.family import family_for

    tiny, transformer, qwen_file, vae_file = zimage_files
    config = cfg_from(transformer, text_encoder=str(qwen_file), vae=str(vae_file))
    family = family_for(config)
    assert family.name == "z-image"
    ours = family.load(config)
    folder = family.load(cfg_from(tiny))
    for part in ("unet", "text_encoder", "vae"):
        want, got = getattr(folder, part).state_dict(), getattr(ours, part).state_dict()
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[key], want[key]) for key in want), part
    assert ours.unet.config.axes_dims == folder.unet.config.axes_dims
    schedules = [{k: v for k, v in c.noise_scheduler.config.items() if not k.startswith("_")} for c in (ours, folder)]
    assert schedules[0] == schedules[1]
    ids = ours.tokenizer(["a photo of sks toy"], padding="max_length", max_length=512, return_tensors="pt").input_ids
    assert torch.equal(ids, folder.tokenizer(["a photo of sks toy"], padding="max_length", max_length=512,
                                             return_tensors="pt").input_ids)


@pytest.mark.parametrize("missing", ["text_encoder", "vae"])
def test_a_transformer_file_without_a_part_is_refused_naming_its_key(zimage_files, missing):
    from engine.errors import UserError
    from engine.models.zimage import ZImage

    _, transformer, qwen_file, vae_file = zimage_files
    given = {"text_encoder": str(qwen_file), "vae": str(vae_file)}
    given.pop(missing)
    with pytest.raises(UserError, match=f"config key '{missing}'"):
        ZImage().load(cfg_from(transformer, **given))


def cfg_from(model, **values):
    from engine import config as cfg

    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, **values})


def test_a_lora_run_over_the_files_converts_to_the_merged_file_and_to_diffusers_layout(
        zimage_files, tmp_path, sample_data):
    from engine.models.convert import convert_checkpoint
    from engine.models.zimage_files import load_zimage_transformer

    tiny, transformer, qwen_file, vae_file = zimage_files
    checkpoint = lora_checkpoint_over_files(tmp_path, transformer, qwen_file, vae_file)
    merged_file = convert_checkpoint(checkpoint, tmp_path / "merged.safetensors", adapter_output="merged")
    base, merged = load_zimage_transformer(transformer).state_dict(), load_zimage_transformer(merged_file).state_dict()
    assert merged.keys() == base.keys()
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    blocks = {key.split(".")[1] for key in base if key.startswith("layers.")}
    assert changed == {f"layers.{i}.{m}.weight" for i in blocks for m in MAIN_BLOCK}
    # diffusers' own LoRA layout, loaded and fused by ZImagePipeline, gives the merged weights
    from diffusers import ZImagePipeline

    lora = convert_checkpoint(checkpoint, tmp_path / "lora", fmt="diffusers")
    pipeline = ZImagePipeline.from_pretrained(tiny)
    with library_messages() as messages:
        pipeline.load_lora_weights(str(lora.parent))  # the folder of pytorch_lora_weights.safetensors
    assert not messages, messages
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    fused = pipeline.transformer.state_dict()
    assert max((fused[key] - merged[key]).abs().max().item() for key in changed) <= WEIGHT_TOLERANCE
