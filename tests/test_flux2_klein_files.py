"""FLUX.2 [klein]'s adapter file: BFL's original module names (keymap_flux2), which ComfyUI maps to its Flux.2
model's weights and diffusers' Flux2 LoRA loader reads, both giving the merged model's weights."""
import pytest
import torch

from client_formulas import comfyui_flux_lora_keys
from conftest import lora_checkpoint_over_files
from engine.config import Network
from engine.models import keymap_flux, keymap_flux2
from engine.models.kohya import from_kohya, to_kohya
from engine.models.tiny import SIZES, real_config
from test_adapter_convert import CHANGED, TOLERANCE, library_messages
from test_flux_files import (TYPES_AND_MODULATION, TYPES_AND_MODULATION_IDS, WEIGHT_TOLERANCE, comfyui_patched,
                             merged, settings)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# two blocks of each kind, so that block indices reach the names
KLEIN = {**real_config("flux2-klein", "transformer"), **SIZES["flux2-klein"]["transformer"], "num_layers": 2,
         "num_single_layers": 2}


def klein_model(seed: int = 0):
    """A tiny Flux2Transformer2DModel, every weight random (none of the zero initial projections)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel.from_config(KLEIN)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def adapt(model, network: Network, seed: int = 1):
    """The model with the network's peft adapter on the modules a FLUX.2 [klein] run adapts, every adapter
    weight random (a trained adapter, not the identity it starts as)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    from engine.models.adapters import target_modules

    common = dict(r=network.rank, target_modules=list(target_modules(model, "unet", network)))
    if network.type in ("lora", "dora"):
        config = LoraConfig(lora_alpha=network.alpha, use_dora=network.type == "dora", **common)
    else:
        config = (LoHaConfig if network.type == "loha" else LoKrConfig)(alpha=network.alpha, **common)
    inject_adapter_in_model(config, model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.empty(param.shape).normal_(generator=generator)
                param.copy_(param * (1 + 0.1 * noise) if "magnitude" in name else 0.3 * noise)
    return model.eval()


def output(model, seed: int = 5):
    """The transformer on a fixed small input: 4 image tokens, 3 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 4, KLEIN["in_channels"], generator=generator)
    text = torch.randn(1, 3, KLEIN["joint_attention_dim"], generator=generator)
    image_ids = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]])
    text_ids = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]])
    with torch.no_grad():
        return model(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.4]),
                     img_ids=image_ids, txt_ids=text_ids, guidance=None).sample


def test_the_original_layout_is_what_diffusers_conversion_script_reads_and_refuses_an_unknown_module():
    state = klein_model().state_dict()
    original = keymap_flux.to_original(state, keymap_flux2.LAYOUT)
    hidden = KLEIN["num_attention_heads"] * KLEIN["attention_head_dim"]
    assert original["double_blocks.1.img_attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert torch.equal(original["double_blocks.1.txt_attn.qkv.weight"][hidden:2 * hidden],
                       state["transformer_blocks.1.attn.add_k_proj.weight"])
    assert torch.equal(original["single_blocks.0.linear1.weight"],
                       state["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"])
    assert torch.equal(original["double_blocks.0.img_attn.norm.query_norm.scale"],
                       state["transformer_blocks.0.attn.norm_q.weight"])
    shift, scale = original["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), state["norm_out.linear.weight"])
    assert len(original) == len(state) - 8  # each double block's two q/k/v triples, each now one tensor
    from engine.errors import UserError

    with pytest.raises(UserError, match="attn.extra.weight"):
        keymap_flux.to_original({**state, "transformer_blocks.0.attn.extra.weight": torch.zeros(2, 2)},
                                keymap_flux2.LAYOUT)


@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_comfyui_loads_every_key_and_computes_the_adapted_weights(network_type, modulation):
    config = settings(network_type, modulation)
    model = adapt(klein_model(), config.network)
    file = to_kohya({"unet": model}, config)
    names = {key.partition(".")[0] for key in file}
    assert {"lora_unet_double_blocks_0_img_mlp_0", "lora_unet_single_blocks_1_linear1",
            "lora_unet_single_blocks_0_linear2"} <= names
    assert ("lora_unet_double_stream_modulation_img_lin" in names) == modulation
    if network_type == "lokr":  # not fusable: a double block's q, k and v apart, under their diffusers paths
        assert {"lora_transformer_transformer_blocks_1_attn_to_q",
                "lora_transformer_transformer_blocks_0_attn_add_v_proj"} <= names
        assert not any(name.endswith("_attn_qkv") for name in names)
    else:
        assert {"lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv"} <= names
        assert not any(name.startswith("lora_transformer_") for name in names)
        assert float(file["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * 2.0  # q, k and v fused
    base = keymap_flux.to_original(klein_model().state_dict(), keymap_flux2.LAYOUT)
    # ComfyUI's Flux.2 model class is a Flux (comfy/model_base.py in Comfy-Org/ComfyUI at
    # 094c74c1b7f9cd5cdd9015741e8eb26acff1142a: `class Flux2(Flux)`), and comfy/model_detection.py (at
    # 0b61ce5baa9ea03d8484729b7eb00e77c6fca227) reads depth, depth_single_blocks and hidden_size from a Flux.2 file
    # as from a Flux.1 one: its map is Flux's, a double block's q, k and v slices of the fused qkv included
    hidden = KLEIN["num_attention_heads"] * KLEIN["attention_head_dim"]
    key_map = comfyui_flux_lora_keys(base, KLEIN["num_layers"], KLEIN["num_single_layers"], hidden)
    patched, loaded = comfyui_patched(file, base, key_map)
    assert loaded == set(file), f"ComfyUI leaves keys unloaded: {sorted(set(file) - loaded)[:3]}"
    want = keymap_flux.to_original(merged(model).state_dict(), keymap_flux2.LAYOUT)
    assert max((want[key] - base[key]).abs().max().item() for key in want) > CHANGED
    for key in want:
        assert (patched[key] - want[key]).abs().max().item() <= WEIGHT_TOLERANCE, key


@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_the_file_reads_back_as_the_adapter_it_was_written_from(network_type, modulation):
    from engine.models.adapters import adapter_state

    config = settings(network_type, modulation)
    model = adapt(klein_model(), config.network)
    file = to_kohya({"unet": model}, config)
    fresh = adapt(klein_model(), config.network, seed=9)
    from_kohya(file, {"unet": fresh}, config, "network.init_from")
    mine, theirs = adapter_state(model), adapter_state(fresh)
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], atol=1e-6, rtol=0, msg=key)


def test_diffusers_flux2_lora_loader_reads_the_file_into_every_module_with_the_merged_output():
    from diffusers.loaders import Flux2LoraLoaderMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = settings("lora", modulation=False)
    model = adapt(klein_model(), config.network)
    file = to_kohya({"unet": model}, config)
    base = klein_model()
    with library_messages() as messages:
        state = Flux2LoraLoaderMixin.lora_state_dict(dict(file))
        Flux2LoraLoaderMixin.load_lora_into_transformer(state, transformer=base)
    assert not messages, messages
    adapted = {name for name, m in base.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == {name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    want, plain = output(merged(model)), output(klein_model())
    assert (want - plain).abs().max().item() > CHANGED
    assert (output(base) - want).abs().max().item() <= TOLERANCE


def test_diffusers_leaves_the_modulation_layers_out_and_a_run_adapting_them_says_so_at_start(tmp_path):
    import warnings

    from diffusers.loaders import Flux2LoraLoaderMixin

    from engine import config as cfg
    from engine.models.flux2_klein import check_config
    from engine.testing import tiny_config

    adapter_settings = settings("lora", modulation=True)
    file = to_kohya({"unet": adapt(klein_model(), adapter_settings.network)}, adapter_settings)
    assert any("modulation" in key for key in file)
    with library_messages() as messages:
        Flux2LoraLoaderMixin.lora_state_dict(dict(file))
    assert any("Unsupported keys" in message and "modulation" in message for message in messages), messages
    for modulation in (True, False):
        config = cfg.from_dict(tiny_config(tmp_path, **{
            "model": "demo:tiny-flux2-klein", "data.resolution": 512, "network.type": "lora",
            "network.modulation": modulation}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_config(config)
        assert [str(w.message).split(":")[0] for w in caught] == (["config key 'network.modulation'"] if modulation
                                                                  else [])


def test_a_full_run_converts_to_the_file_diffusers_from_single_file_reads_bit_equal(demo_cache, tmp_path):
    """A full fine-tune's transformer, as the trainer's checkpoint holds it (unet/), becomes one BFL-layout
    file without prefix (ComfyUI's diffusion_models/)."""
    import json

    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    from engine import paths
    from engine.models.convert import convert_checkpoint

    model = klein_model()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    model.save_pretrained(checkpoint / "unet")
    (checkpoint / "meta.json").write_text(json.dumps({
        "step": 2, "epoch": 0, "base_model": str(paths.demo_model_dir("flux2-klein")), "trained": ["unet"],
        "network": "full"}))
    written = convert_checkpoint(checkpoint, tmp_path / "out", unet_dtype="bf16")
    tensors = load_file(written)
    assert tensors.keys() == keymap_flux.to_original(model.state_dict(), keymap_flux2.LAYOUT).keys()
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    model.save_config(tmp_path / "configs" / "transformer")
    with library_messages() as messages:
        loaded = Flux2Transformer2DModel.from_single_file(str(written), config=str(tmp_path / "configs"),
                                                          subfolder="transformer", local_files_only=True,
                                                          torch_dtype=torch.bfloat16)
    assert not [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not used"))]
    want, got = model.to(torch.bfloat16).state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[key], want[key]) for key in want)


# -- FLUX.2 [klein] as ComfyUI users keep it: the transformer's file, Qwen3's and the autoencoder's ----------------
def _save(path, tensors: dict):
    from safetensors.torch import save_file

    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path))
    return path


def ldm_vae(vae, inner_quant_convs: bool = False) -> dict:
    """FLUX.2's autoencoder in the LDM layout (the engine's SD converter, whose autoencoder layout it is) with its
    batch-norm statistics (bn.*, which comfy/sd.py reads as a batch-norm latent); with inner_quant_convs the quant
    convolutions inside the encoder and decoder, where ComfyUI's loader also finds them."""
    from engine.models.keymap import VAE_PREFIX, to_original, vae_key_map

    state = vae.state_dict()
    coder = {k: v for k, v in state.items() if not k.startswith("bn.")}
    out = {k.removeprefix(VAE_PREFIX): v for k, v in to_original(coder, vae_key_map(vae.config, coder.keys())).items()}
    if inner_quant_convs:
        out = {("encoder." if k.startswith("quant_conv.") else "decoder." if k.startswith("post_quant_conv.") else "")
               + k: v for k, v in out.items()}
    return {**out, **{k: v for k, v in state.items() if k.startswith("bn.")}}


@pytest.fixture(scope="module")
def klein_files(tmp_path_factory, demo_cache):
    """The tiny klein's transformer converted to its BFL file, with its Qwen3 as transformers saves it (the decoder
    under model., ComfyUI's qwen_3_4b layout) and its autoencoder as the LDM file."""
    from diffusers import AutoencoderKLFlux2
    from safetensors.torch import load_file

    from engine import paths
    from engine.models.convert import convert_checkpoint

    tiny = paths.demo_model_dir("flux2-klein")
    folder = tmp_path_factory.mktemp("klein-files")
    transformer = convert_checkpoint(tiny, folder / "flux-2-klein.safetensors")
    qwen_file = _save(folder / "qwen_3_4b.safetensors", load_file(tiny / "text_encoder" / "model.safetensors"))
    vae = AutoencoderKLFlux2.from_pretrained(tiny / "vae")
    with torch.no_grad():  # statistics of a trained autoencoder, not the initial zeros and ones
        vae.bn.running_mean.normal_(0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    files = {inner: _save(folder / f"flux2-vae{'-bfl' if inner else ''}.safetensors", ldm_vae(vae, inner))
             for inner in (False, True)}
    return tiny, transformer, qwen_file, files, vae


def klein_cfg(model, **values):
    from engine import config as cfg

    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, "data": {"resolution": 512},
                          **values})


def test_the_transformer_file_is_comfyuis_flux2_and_the_autoencoders_ldm_part_reads_in_diffusers(klein_files,
                                                                                                  tmp_path):
    from diffusers import AutoencoderKL

    from engine.models.single_file import detect_family, read_shapes

    _, transformer, _, files, vae = klein_files
    shapes = read_shapes(transformer)
    assert "double_stream_modulation_img.lin.weight" in shapes  # comfy/model_detection.py's test for Flux.2
    assert detect_family(shapes) == "flux2"
    assert {"bn.running_mean", "bn.running_var", "decoder.conv_in.weight"} <= read_shapes(files[False]).keys()
    plain = AutoencoderKL(**{k: v for k, v in vae.config.items() if k in (
        "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "down_block_types",
        "up_block_types", "use_quant_conv", "use_post_quant_conv")})
    plain.save_config(tmp_path / "configs" / "vae")
    read = AutoencoderKL.from_single_file(str(files[False]), config=str(tmp_path / "configs"), subfolder="vae",
                                          local_files_only=True).state_dict()
    want = {k: v for k, v in vae.state_dict().items() if not k.startswith("bn.")}
    assert read.keys() == want.keys() and all(torch.equal(read[k], want[k]) for k in want)


@pytest.mark.parametrize("inner_quant_convs", [False, True], ids=["top-level-quant-convs", "bfl-quant-convs"])
def test_the_three_files_load_for_training_as_the_diffusers_folder(klein_files, inner_quant_convs):
    from engine.models.family import family_for

    tiny, transformer, qwen_file, files, vae = klein_files
    config = klein_cfg(transformer, text_encoder=str(qwen_file), vae=str(files[inner_quant_convs]))
    family = family_for(config)
    assert family.name == "flux2-klein"
    ours, folder = family.load(config), family.load(klein_cfg(tiny))
    for got, want in ((ours.unet, folder.unet), (ours.text_encoder, folder.text_encoder), (ours.vae, vae)):
        got, want = got.state_dict(), want.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ours.unet.config.axes_dims_rope == folder.unet.config.axes_dims_rope
    assert ours.text_encoder.lm_head.weight is ours.text_encoder.model.embed_tokens.weight  # tied, as Qwen3-4B's
    schedules = [{k: v for k, v in c.noise_scheduler.config.items() if not k.startswith("_")} for c in (ours, folder)]
    assert schedules[0] == schedules[1]
    ids = ours.tokenizer(["a photo of sks toy"], return_tensors="pt").input_ids
    assert torch.equal(ids, folder.tokenizer(["a photo of sks toy"], return_tensors="pt").input_ids)
    with torch.no_grad():
        got, want = (family.encode_text(c.text_encoder, ids, 1) for c in (ours, folder))
    assert torch.equal(got["encoder_hidden_states"], want["encoder_hidden_states"])


@pytest.mark.parametrize("missing", ["text_encoder", "vae"])
def test_a_transformer_file_without_a_part_is_refused_naming_its_key(klein_files, missing):
    from engine.errors import UserError
    from engine.models.family import family_for

    _, transformer, qwen_file, files, _ = klein_files
    given = {"text_encoder": str(qwen_file), "vae": str(files[False])}
    given.pop(missing)
    config = klein_cfg(transformer, **given)
    with pytest.raises(UserError, match=f"^config key '{missing}': a single-file FLUX.2 \\[klein\\] model holds"):
        family_for(config).load(config)


def test_a_flux1_autoencoder_is_refused_naming_the_vae_key(klein_files, tmp_path):
    from engine.errors import UserError
    from engine.models.family import family_for
    from engine.models.keymap import VAE_PREFIX, to_original, vae_key_map
    from test_flux_files import tiny_vae

    _, transformer, qwen_file, _, _ = klein_files
    flux1 = tiny_vae()
    state = flux1.state_dict()
    ae = _save(tmp_path / "ae.safetensors", {k.removeprefix(VAE_PREFIX): v for k, v in to_original(
        state, vae_key_map(flux1.config, state.keys())).items()})
    config = klein_cfg(transformer, text_encoder=str(qwen_file), vae=str(ae))
    with pytest.raises(UserError, match="^config key 'vae': ae.safetensors is not FLUX.2's autoencoder"):
        family_for(config).load(config)


def test_a_lora_run_over_the_files_converts_to_the_merged_file(klein_files, tmp_path, sample_data):
    """Two steps of a LoRA over the three files; the merged conversion reads its base from the transformer file and
    changes exactly the adapted weights, in BFL's layout again."""
    from engine.models.convert import convert_checkpoint
    from engine.models.flux2_klein_files import load_klein_transformer
    from test_flux2_klein import BLOCK_MODULES

    _, transformer, qwen_file, files, _ = klein_files
    checkpoint = lora_checkpoint_over_files(tmp_path, transformer, qwen_file, files[False])
    merged_file = convert_checkpoint(checkpoint, tmp_path / "merged.safetensors", adapter_output="merged")
    base, merged = (load_klein_transformer(f).state_dict() for f in (transformer, merged_file))
    assert merged.keys() == base.keys()
    changed = {key.rpartition(".")[0] for key in base if not torch.equal(base[key], merged[key])}
    assert changed == BLOCK_MODULES
