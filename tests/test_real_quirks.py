"""The tiny stand-ins carry the real models' quirks: their configs differ from the shipped real ones only
in widths and depths, they tokenize with the real CLIP vocabulary, and their prompts reach the text
encoders exactly as diffusers' own pipelines send them."""
import importlib.util
import json

import pytest
import torch

from engine import paths
from engine.config import from_dict
from engine.data.dataset import Collate, tokenize
from engine.models import clip_vocab
from engine.models.family import family_for
from engine.models.tiny import ARCHITECTURES, REAL_CONFIGS

# What a stand-in may shrink, per kind of component. Everything else (special-token ids, activations,
# padding, scaling factors, prediction type, force_upcast, the noise schedule) must be the real value.
SIZE_KEYS = {
    "text": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim"},
    "t5": {"d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers"},
    "transformer": {"num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "axes_dims_rope",
                    "joint_attention_dim", "pooled_projection_dim", "approximator_hidden_dim", "approximator_layers"},
    "unet": {"sample_size", "layers_per_block", "block_out_channels", "down_block_types", "up_block_types",
             "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim", "norm_num_groups",
             "addition_time_embed_dim", "projection_class_embeddings_input_dim"},
    "vae": {"block_out_channels", "layers_per_block", "norm_num_groups", "sample_size", "base_dim", "num_res_blocks"},
    # Z-Image's and FLUX.2 [klein]'s Qwen3 (layer_types: one entry per layer), Z-Image's transformer
    "qwen3": {"hidden_size", "intermediate_size", "num_hidden_layers", "max_window_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "layer_types"},
    "zimage": {"dim", "n_heads", "n_kv_heads", "n_layers", "n_refiner_layers", "axes_dims", "cap_feat_dim"},
    # Qwen2.5-VL: its language model's and (behind `vision.`) its vision tower's sizes; layer_types lists one entry
    # per layer and rope_parameters holds the rotary sections of the narrower heads
    "qwen-vl": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_window_layers", "layer_types", "rope_parameters", "vision.depth", "vision.hidden_size",
                "vision.intermediate_size", "vision.num_heads", "vision.out_hidden_size",
                "vision.fullatt_block_indexes"},
    "scheduler": set(),
}
# Written by the libraries, not part of the architecture (transformers writes the saved class as architectures:
# Z-Image's real file names Qwen3ForCausalLM, which its pipeline loads as Qwen3Model).
BOOKKEEPING = {"_diffusers_version", "transformers_version", "_name_or_path", "dtype", "_use_default_values",
               "architectures"}

# The real tokenizers' padding (tokenizer_config.json of runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0).
REAL_PADDING = {"sd": {"tokenizer": "<|endoftext|>"}, "sd21": {"tokenizer": "!"},
                "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
                # black-forest-labs/FLUX.1-dev and -schnell: tokenizer/ is CLIP ViT-L's, padded with the end token
                "flux": {"tokenizer": "<|endoftext|>"}, "flux-schnell": {"tokenizer": "<|endoftext|>"},
                "chroma": {},  # lodestones/Chroma1-HD: T5's tokenizer alone
                "qwen-image": {},  # Qwen2's tokenizer, checked below
                "flux2-klein": {}}  # a Qwen tokenizer: tests/test_flux2_klein.py holds its ids

# "#" is id 2, the text encoders' configured eos_token_id; SDXL's second tokenizer splits every "!" out
PROMPTS = ["a photo of sks toy", "", "#1 best, sks toy!! on a #red# table", "a, b,, c ,d!", "photo of #",
           "wow!!! what?! (best:1.2)! !?!", " ".join(f"word{i}" for i in range(90)),
           " ".join(f"w{i}!!" for i in range(40)), "a " * 74 + "!!!!!!!!"]


def _full_config(component: str, folder):
    """Every value the component is built with: the file's values over the class defaults."""
    import diffusers
    from transformers import AutoConfig, CLIPTextConfig

    if component.startswith("text_encoder"):
        values = json.loads((folder / "config.json").read_text())
        if values.get("model_type") == "qwen3":
            return "qwen3", AutoConfig.from_pretrained(folder).to_dict()
        if values["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]:
            from transformers import Qwen2_5_VLConfig

            values = Qwen2_5_VLConfig.from_pretrained(folder).to_dict()
            vision = {f"vision.{k}": v for k, v in values.pop("vision_config").items()}
            return "qwen-vl", {**values.pop("text_config"), **vision, **values}
        if values["architectures"] == ["T5EncoderModel"]:
            from transformers import T5EncoderModel

            # as the encoder-only model is built: it switches off is_encoder_decoder and use_cache itself
            with torch.device("meta"):
                return "t5", T5EncoderModel(AutoConfig.from_pretrained(folder)).config.to_dict()
        return "text", CLIPTextConfig.from_pretrained(folder).to_dict()
    if component == "scheduler":
        values = json.loads((folder / "scheduler_config.json").read_text())
        return "scheduler", dict(getattr(diffusers, values["_class_name"]).from_config(values).config)
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    if cls is diffusers.ZImageTransformer2DModel:
        component = "zimage"
    with torch.device("meta"):
        return component, dict(cls.from_config(cls.load_config(folder)).config)


def _library_class(entry):
    """A model_index entry's class: transformers 5 writes "T5Tokenizer" where the real files (written by
    transformers 4) say "T5TokenizerFast", one class now."""
    if not (isinstance(entry, list) and entry[0]):
        return entry
    return getattr(importlib.import_module(entry[0]), entry[1])


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_non_size_value_of_each_tiny_config_is_the_real_ones(arch, demo_cache):
    tiny = paths.demo_model_dir(arch)
    real = REAL_CONFIGS / ARCHITECTURES[arch]
    index = json.loads((real / "model_index.json").read_text())
    tiny_index = json.loads((tiny / "model_index.json").read_text())
    assert {k: _library_class(tiny_index.get(k)) for k in index if k not in BOOKKEEPING} == {
        k: _library_class(v) for k, v in index.items() if k not in BOOKKEEPING}
    # diffusers lists the optional components it has no model for
    assert all(tiny_index[k] == [None, None] for k in tiny_index.keys() - index.keys() - BOOKKEEPING)
    components = [name for name, value in index.items() if isinstance(value, list) and value[0]
                  and not name.startswith(("tokenizer", "processor"))]
    for component in components:
        kind, real_values = _full_config(component, real / component)
        _, tiny_values = _full_config(component, tiny / component)
        differing = {k for k in real_values.keys() | tiny_values.keys() if real_values.get(k) != tiny_values.get(k)}
        assert differing - BOOKKEEPING <= SIZE_KEYS[kind], (component, {
            k: (real_values.get(k), tiny_values.get(k)) for k in differing - BOOKKEEPING - SIZE_KEYS[kind]})
    from transformers import CLIPTokenizer

    for name, pad in REAL_PADDING.get(arch, {}).items():  # Z-Image's Qwen tokenizer: tests/test_zimage.py
        tokenizer = CLIPTokenizer.from_pretrained(tiny / name)
        assert (len(tokenizer), tokenizer.model_max_length) == (49408, 77)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token) == (49406, 49407, pad)
    if index["_class_name"] in ("FluxPipeline", "ChromaPipeline"):
        from transformers import T5TokenizerFast

        # google/t5-v1_1-xxl's vocabulary as FLUX.1's tokenizer_2/ (Chroma's tokenizer/) holds it: <pad> 0,
        # </s> 1, <unk> 2
        t5 = T5TokenizerFast.from_pretrained(tiny / ("tokenizer_2" if "tokenizer_2" in index else "tokenizer"))
        assert (len(t5), t5.model_max_length, t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (
            32100, 512, 0, 1, 2)
    if "processor" in index:  # Qwen-Image-Edit's: Qwen2.5-VL's image preprocessing, which has no size to shrink
        from transformers import AutoImageProcessor

        assert (AutoImageProcessor.from_pretrained(tiny / "processor").to_dict()
                == AutoImageProcessor.from_pretrained(real / "processor").to_dict())
    if index["_class_name"] in ("QwenImagePipeline", "QwenImageEditPlusPipeline"):
        from transformers import Qwen2Tokenizer

        # Qwen2.5-VL-7B-Instruct's tokenizer (Qwen/Qwen-Image's tokenizer/): 151,643 BPE tokens, 22 special ones
        qwen = Qwen2Tokenizer.from_pretrained(tiny / "tokenizer")
        assert (len(qwen), qwen.pad_token, qwen.pad_token_id, qwen.eos_token, qwen.convert_tokens_to_ids(
            "<|im_start|>")) == (151665, "<|endoftext|>", 151643, "<|im_end|>", 151644)


def _open_clip_tokenizer():
    """open_clip's own tokenizer (OpenAI's CLIP code, reading the vocabulary file itself), loaded without the
    package's __init__, which would import torchvision."""
    location = clip_vocab.vocabulary_file().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", location)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


CORPUS = [
    "a photo of sks toy", "", "A Photo, of #1 sks-toy!!!", "(masterpiece:1.2), [blue sky], <lora:x:0.8>, {a|b}",
    "((best quality)), (worst quality:-0.5) BREAK red", "café naïve résumé ÆØÅ ß 日本語 テスト 한국어 🙂🎨",
    "  multiple   spaces\tand\nnewlines ", "it's don't we'll I'M", "UPPER lower MiXeD 123 4.56 7,890 1e-5",
    "fish & chips; a|b \\ c / d ~ e ^ f", "sks_toy-v2.0 @user #tag $5 %50 *star*",
    " ".join(f"word{i}" for i in range(90)), "a " * 100,
]


def test_the_clip_vocabulary_tokenizes_as_open_clips_own_tokenizer():
    tokenizer = clip_vocab.clip_tokenizer()
    reference = _open_clip_tokenizer()
    assert len(tokenizer) == len(reference.encoder) == 49408
    for text in CORPUS:
        ours = tokenize(tokenizer, text)
        theirs = reference(text)[0].tolist()  # 77 ids, truncated with the end token last, padded with 0
        assert ours == theirs[:len(ours)], text
        assert all(token == 0 for token in theirs[len(ours):]), text
    assert len(tokenize(tokenizer, CORPUS[-2])) == 77


# Flux.1's, Chroma's, Z-Image's and Qwen-Image's prompts are held to their pipelines' encode_prompt in
# tests/test_flux.py, tests/test_chroma.py, tests/test_zimage.py and tests/test_qwen_image.py (their
# encode_prompt differs).
@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES
                                  if not arch.startswith(("flux", "chroma", "z-image", "qwen"))])
def test_prompts_reach_the_text_encoders_as_diffusers_pipeline_encode_prompt_sends_them(arch, demo_cache):
    import diffusers

    model = paths.demo_model_dir(arch)
    config = from_dict({"model": str(model)})
    family = family_for(config)
    components = family.load(config)
    index = json.loads((model / "model_index.json").read_text())
    pipeline = getattr(diffusers, index["_class_name"]).from_pretrained(model)
    collate = Collate(components.tokenizer.pad_token_id, 77, pad_to_max=config.pad_tokens)
    with torch.no_grad():
        for prompt in PROMPTS:
            example = {"input_ids": tokenize(components.tokenizer, prompt), "pixel_values": torch.zeros(1),
                       "caption": prompt, "path": "", "sample_key": 0, "time_ids": [0] * 6}
            ids = collate([{"instance": example}])["input_ids"]
            ours = family.encode_text(components.text_encoder, ids, config.clip_stop_at_layer)
            if arch == "sdxl":
                second = pipeline.tokenizer_2(prompt, padding="max_length", max_length=77, truncation=True,
                                              return_tensors="pt").input_ids
                assert torch.equal(components.text_encoder.ids_for_second(ids), second), prompt
                embeds, _, pooled, _ = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
                torch.testing.assert_close(ours["text_embeds"], pooled, atol=1e-6, rtol=0)
            else:
                embeds, _ = pipeline.encode_prompt(prompt, "cpu", 1, False)
            torch.testing.assert_close(ours["encoder_hidden_states"], embeds, atol=1e-6, rtol=0, msg=prompt)
