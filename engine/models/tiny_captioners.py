"""Tiny random captioning models for the offline demo and the tests: `python -m engine make-tiny-model --arch A`.

Each keeps its real model's configuration but for the sizes in `SIZES`: special-token and image-token ids,
vocabulary size, patch and merge sizes, image normalization, and its turn format (Qwen2-VL's chat template; Qwen3-VL's
and Llama 3.1's without their tool-calling parts). Random weights caption nonsense, but through the same processor
and generation code as the real model.

- `qwen2.5-vl` (Qwen/Qwen2.5-VL-3B-Instruct) and `qwen3-vl` (Qwen/Qwen3-VL-2B-Instruct) tokenize with Qwen2's
  real byte-level BPE vocabulary (`qwen2_vocab`) and its real special tokens and ids.
- `florence2` (microsoft/Florence-2-base, as transformers' converted Florence2 layout) and `joycaption`
  (fancyfeast/llama-joycaption-beta-one-hf-llava: SigLIP and Llama 3.1) have vocabularies no offline package
  carries (BART's, Llama 3's): their tokenizers are byte-level BPEs built with `tokenizers` from Qwen2's
  merges that keep the real special tokens at their real ids, in a model with the real vocabulary size
  (JoyCaption's fills only the first 64,000 of Llama 3's 128,000 ordinary ids).
- `wd14` (SmilingWolf/wd-vit-tagger-v3's layout): a one-layer ONNX graph with the real input (NHWC BGR 448 px,
  named `input`) and sigmoid output, and a selected_tags.csv of a few real tags of each category.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

ARCHITECTURES = ("qwen2.5-vl", "qwen3-vl", "florence2", "joycaption", "wd14")

# Qwen2-VL's chat template (shipped with Qwen2.5-VL): a default system turn, images as vision-start, one
# image-pad token the processor expands, vision-end.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's special tokens from <|endoftext|> on (Qwen3-VL's tokenizer has the last four too).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                 "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN_FIRST_SPECIAL = 151643
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (a flat Hub config).
QWEN25_VL = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
QWEN25_VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# Qwen3-VL's turn format: no default system turn; the image as in Qwen2-VL's.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3's (text) turn format (Qwen/Qwen3-4B's tokenizer_config.json, Z-Image's tokenizer) for system, user
# and assistant turns, without its tool-calling and reasoning-history parts: no default system turn, and the
# empty think block after the assistant's start when enable_thinking is false.
QWEN3_TEXT_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")
# Qwen/Qwen3-VL-2B-Instruct's config.json.
QWEN3_VL = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": {"model_type": "qwen3_vl_text", "attention_bias": False, "attention_dropout": 0.0,
                    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
                    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
                    "max_position_embeddings": 262144, "num_attention_heads": 16, "num_hidden_layers": 28,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "vision_config": {"model_type": "qwen3_vl", "deepstack_visual_indexes": [5, 11, 17], "depth": 24,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024, "in_channels": 3,
                      "initializer_range": 0.02, "intermediate_size": 4096, "num_heads": 16,
                      "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2},
}
QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
}

# fancyfeast/llama-joycaption-beta-one-hf-llava: SigLIP so400m (384 px, 14 px patches: 729 image tokens, all
# kept) and Llama 3.1 8B, whose reserved special token 69 (128077) stands for the image.
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<|reserved_special_token_0|>",
                   128003: "<|reserved_special_token_1|>", 128004: "<|finetune_right_pad_id|>",
                   128005: "<|reserved_special_token_2|>", 128006: "<|start_header_id|>",
                   128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>",
                   **{128008 + n: f"<|reserved_special_token_{n}|>" for n in range(3, 248)}}
JOYCAPTION_IMAGE_TOKEN = "<|reserved_special_token_69|>"
# Llama 3.1's turn format, with the date lines of its system turn; the image token where the image goes.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'system' %}{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' }}"
    "{%- endif %}{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{{- '" + JOYCAPTION_IMAGE_TOKEN + "' }}{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
JOYCAPTION = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 128077,
    "image_seq_length": 729, "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "full", "tie_word_embeddings": False,
    "text_config": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    "max_position_embeddings": 131072, "bos_token_id": 128000,
                    "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004, "tie_word_embeddings": False,
                    "attention_bias": False, "mlp_bias": False},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "layer_norm_eps": 1e-06, "hidden_act": "gelu_pytorch_tanh"},
}
JOYCAPTION_PREPROCESSOR = {
    "image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor", "do_resize": True,
    "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
JOYCAPTION_PROCESSOR = {"image_token": JOYCAPTION_IMAGE_TOKEN, "patch_size": 14,
                        "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}

# Only these keys differ from the real configs. Qwen2.5-VL: two heads of 8 channels whose rotary halves split
# over (time, height, width) as the real 128 do (16, 24, 24); full attention in the last vision block, as in
# every eighth of the real ones.
SIZES = {
    "qwen2.5-vl": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "max_window_layers": 2,
                   "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
                   "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                                     "out_hidden_size": 16, "fullatt_block_indexes": [1]}},
    # Qwen3-VL: 8-channel heads whose rotary halves interleave over (time, height, width) as the real 64 do
    # (24, 20, 20); deep-stack features into the first text layer, as the real ones go into the first three
    "qwen3-vl": {"text_config": {"head_dim": 8, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                 "num_hidden_layers": 2, "num_key_value_heads": 1,
                                 "rope_scaling": {"mrope_interleaved": True, "mrope_section": [2, 1, 1],
                                                  "rope_type": "default"}},
                 "vision_config": {"deepstack_visual_indexes": [0], "depth": 2, "hidden_size": 16,
                                   "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16}},
    # JoyCaption: two SigLIP layers (features from the second to last, as the real -2), Llama with 4-channel heads
    "joycaption": {"text_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4},
                   "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                     "num_hidden_layers": 2}},
    # Florence-2: four DaViT stages (the real 32x downsampling, 577 image tokens at 768 px) one block deep
    "florence2": {"text_config": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                                  "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
                                  "decoder_ffn_dim": 32},
                  "vision_config": {"depths": [1, 1, 1, 1], "embed_dim": [8, 8, 16, 16], "num_heads": [1, 1, 2, 2],
                                    "num_groups": [1, 1, 2, 2], "projection_dim": 16}},
}


def _shrunk(real: dict, sizes: dict) -> dict:
    config = json.loads(json.dumps(real))
    for key, value in sizes.items():
        if key.endswith("_config"):
            config[key].update(value)
        else:
            config[key] = value
    return config


def _save_model(model_class, config: dict, folder: Path, seed: int) -> None:
    """A model of config with seeded random weights, saved in bfloat16 (half the size; the real ones are too)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model_config = transformers.AutoConfig.for_model(**config)
    model = model_class(model_config)
    with torch.no_grad():
        # Weights drawn at unit gain, not the real initializer's small one: then the tiny captions differ from
        # image to image, and a test can tell one image's caption from another's.
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, parameter.shape[-1] ** -0.5)
    model.to(torch.bfloat16).save_pretrained(folder)


def qwen_tokenizer_files(folder: Path, specials: list[str], chat_template: str) -> None:
    """Write a Qwen2Tokenizer's files into folder: Qwen's vocabulary, `specials` from <|endoftext|>'s id on."""
    from . import qwen2_vocab

    vocab, merges = qwen2_vocab.files()
    shutil.copyfile(vocab, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    added = {str(QWEN_FIRST_SPECIAL + i): {"content": token, "lstrip": False, "rstrip": False, "normalized": False,
                                           "single_word": False, "special": True}
             for i, token in enumerate(specials)}
    tokenizer_config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
                        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                        "model_max_length": 131072, "errors": "replace", "split_special_tokens": False,
                        "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1), encoding="utf-8")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}), encoding="utf-8")


def make_qwen25_vl(folder: Path, seed: int = 0) -> None:
    import transformers

    _save_model(transformers.Qwen2_5_VLForConditionalGeneration, _shrunk(QWEN25_VL, SIZES["qwen2.5-vl"]), folder,
                seed)
    (folder / "preprocessor_config.json").write_text(json.dumps(QWEN25_VL_PREPROCESSOR, indent=1), encoding="utf-8")
    qwen_tokenizer_files(folder, QWEN_SPECIALS[:22], QWEN_CHAT_TEMPLATE)


def _byte_bpe(specials: dict[int, str], size: int):
    """A byte-level BPE vocabulary holding `specials` at their ids and, in the free ids below `size`, the 256
    byte symbols and then Qwen2's merges by rank: (vocab, merges)."""
    from . import qwen2_vocab

    vocab_file, merges_file = qwen2_vocab.files()
    qwen = json.loads(vocab_file.read_text(encoding="utf-8"))
    by_rank = sorted(qwen, key=qwen.get)
    free = (index for index in range(size) if index not in specials)
    vocab = {token: index for index, token in specials.items()}
    merged = []
    for token, index in zip(by_rank, free):
        vocab[token] = index
        merged.append(token)
    lines = merges_file.read_text(encoding="utf-8").splitlines()[1:]
    # the first 256 tokens are the bytes, each later one is one merge
    merges = [tuple(line.split(" ")) for line in lines[:len(merged) - 256]]
    return vocab, merges


def make_qwen3_vl(folder: Path, seed: int = 0) -> None:
    import transformers

    _save_model(transformers.Qwen3VLForConditionalGeneration, _shrunk(QWEN3_VL, SIZES["qwen3-vl"]), folder, seed)
    (folder / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR, indent=1), encoding="utf-8")
    qwen_tokenizer_files(folder, QWEN_SPECIALS, QWEN3_CHAT_TEMPLATE)


def make_joycaption(folder: Path, seed: int = 0) -> None:
    import transformers

    _save_model(transformers.LlavaForConditionalGeneration, _shrunk(JOYCAPTION, SIZES["joycaption"]), folder, seed)
    # Half of Llama 3's 128,000 ordinary ids keeps the tokenizer file small; the others decode to nothing.
    vocab, merges = _byte_bpe(LLAMA3_SPECIALS, 64000)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(vocab, merges, LLAMA3_SPECIALS.values()), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", model_max_length=131072)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(JOYCAPTION_PREPROCESSOR, indent=1), encoding="utf-8")
    (folder / "processor_config.json").write_text(json.dumps(JOYCAPTION_PROCESSOR, indent=1), encoding="utf-8")
    (folder / "chat_template.jinja").write_text(LLAMA3_CHAT_TEMPLATE, encoding="utf-8")


def _bpe_tokenizer(vocab: dict, merges: list, specials):
    """A byte-level BPE `tokenizers.Tokenizer` whose special tokens are never split."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return tokenizer


# microsoft/Florence-2-base in transformers' Florence2 layout (florence-community/Florence-2-base): a DaViT
# image encoder and BART; <image> (51289) follows BART's 50265 tokens and Florence-2's 1024 task and location
# tokens, so the text vocabulary has one row more than the original 51289.
FLORENCE_TASK_TOKENS = (["<od>", "</od>", "<ocr>", "</ocr>"] + [f"<loc_{i}>" for i in range(1000)] +
                        ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
                         "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
                         "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"])
FLORENCE2 = {
    "architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2", "image_token_id": 51289,
    "is_encoder_decoder": True, "tie_word_embeddings": True,
    "text_config": {"model_type": "bart", "vocab_size": 51290, "d_model": 768, "encoder_layers": 6,
                    "decoder_layers": 6, "encoder_attention_heads": 12, "decoder_attention_heads": 12,
                    "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072, "max_position_embeddings": 1024,
                    "activation_function": "gelu", "dropout": 0.1, "attention_dropout": 0.1,
                    "activation_dropout": 0.1, "scale_embedding": False, "bos_token_id": 0, "pad_token_id": 1,
                    "eos_token_id": 2, "decoder_start_token_id": 2, "forced_bos_token_id": 0,
                    "forced_eos_token_id": 2, "no_repeat_ngram_size": 3, "num_beams": 3, "early_stopping": True},
    "vision_config": {"model_type": "florence_vision", "depths": [1, 1, 9, 1], "embed_dim": [128, 256, 512, 1024],
                      "num_heads": [4, 8, 16, 32], "num_groups": [4, 8, 16, 32], "patch_size": [7, 3, 3, 3],
                      "patch_stride": [4, 2, 2, 2], "patch_padding": [3, 1, 1, 1],
                      "patch_prenorm": [False, True, True, True], "window_size": 12, "projection_dim": 768,
                      "max_temporal_embeddings": 100, "max_position_embeddings": 50},
}
FLORENCE2_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor", "processor_class": "Florence2Processor", "do_resize": True,
    "size": {"height": 768, "width": 768}, "resample": 3, "do_center_crop": False, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True, "image_seq_length": 577,
}


def make_florence2(folder: Path, seed: int = 0) -> None:
    import transformers

    _save_model(transformers.Florence2ForConditionalGeneration, _shrunk(FLORENCE2, SIZES["florence2"]), folder, seed)
    specials = {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>", 50264: "<mask>", 51289: "<image>"}
    specials.update({50265 + i: token for i, token in enumerate(FLORENCE_TASK_TOKENS)})
    vocab, merges = _byte_bpe(specials, 51290)
    tokenizer = transformers.RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=1024,
                                              extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens(FLORENCE_TASK_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(FLORENCE2_PREPROCESSOR, indent=1), encoding="utf-8")


# SmilingWolf/wd-vit-tagger-v3: the side and channel layout of its input, and a few of its tags.
WD14_SIDE = 448
WD14_TAGS = [  # (tag_id, name, category, count) as selected_tags.csv writes them
    (9999999, "general", 9, 807489), (9999998, "sensitive", 9, 1232313), (9999997, "questionable", 9, 213576),
    (9999996, "explicit", 9, 200733), (470575, "1girl", 0, 4367855), (212816, "solo", 0, 3617917),
    (13197, "long_hair", 0, 2913399), (8601, "breasts", 0, 1698897), (469576, "looking_at_viewer", 0, 1493302),
    (16867, "outdoors", 0, 371393), (3843, "sky", 0, 291012), (402, "^_^", 0, 22005),
    (1302, "hatsune_miku", 4, 120587), (1397, "hakurei_reimu", 4, 74683),
]


def make_wd14(folder: Path, seed: int = 0) -> None:
    """The tagger's graph: the mean colour of the image through one random linear layer, then a sigmoid."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    count = len(WD14_TAGS)
    # centred on mid-grey and steep enough that images of different colours get different tags
    weight = (rng.standard_normal((3, count)) / 48).astype(np.float32)
    bias = -128 * weight.sum(axis=0)
    axes = numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "weight"], ["logits"]),
             helper.make_node("Add", ["logits", "bias"], ["biased"]),
             helper.make_node("Sigmoid", ["biased"], ["output"])]
    graph = helper.make_graph(
        nodes, "tiny-wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WD14_SIDE, WD14_SIDE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", count])],
        [axes, numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    lines = ["tag_id,name,category,count"] + [",".join(map(str, row)) for row in WD14_TAGS]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


BUILDERS = {"qwen2.5-vl": make_qwen25_vl, "qwen3-vl": make_qwen3_vl, "florence2": make_florence2,
            "joycaption": make_joycaption, "wd14": make_wd14}


def make_tiny_captioner(folder: str | Path, arch: str, seed: int = 0) -> Path:
    """Write the tiny captioner `arch` (one of ARCHITECTURES) into folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    BUILDERS[arch](folder, seed)
    return folder
