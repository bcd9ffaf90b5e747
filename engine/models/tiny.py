"""Offline demo assets: tiny random Stable Diffusion pipelines and a synthetic dataset.

Nothing here downloads anything. Each tiny pipeline is a real architecture's shipped configs
(`configs/pipelines/`) with only widths and depths shrunk, so it keeps every quirk of the real model:
special-token ids, padding tokens, activations, scaling factors, prediction type, `force_upcast`, the
noise schedule. It tokenizes with the real CLIP vocabulary and its real padding token (Flux.1's second
tokenizer, and Chroma's only one, with T5's real vocabulary, `t5_vocab`; Z-Image's, Qwen-Image's and FLUX.2
[klein]'s with Qwen2's, `qwen2_vocab`, Qwen3's special tokens at their real ids for Z-Image and klein).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from . import clip_vocab, t5_vocab, tiny_captioners

REAL_CONFIGS = Path(__file__).resolve().parent / "configs" / "pipelines"
# demo architecture name: the shipped real configs it shrinks
ARCHITECTURES = {"sd": "sd15", "sd21": "sd21", "sdxl": "sdxl", "flux": "flux1-dev", "flux-schnell": "flux1-schnell",
                 "chroma": "chroma", "z-image": "z-image", "qwen-image": "qwen-image", "flux2-klein": "flux2-klein-4b",
                 "qwen-image-edit": "qwen-image-edit"}
TINY_TEXT_DIM = 32


def _text(layers: int, width: int = TINY_TEXT_DIM) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": 4, "projection_dim": width}


# Four blocks give three 2x downsamples: the same 8x image-to-latent geometry as the real VAEs.
_VAE = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64}
_SD_UNET = {"sample_size": 8, "layers_per_block": 1, "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": TINY_TEXT_DIM,
            "norm_num_groups": 16}
_TIME_EMBED_DIM = 8
# SDXL's time ids: original size, crop top-left and target size, two numbers each.
_TIME_IDS = 6
# Flux.1: one double-stream and one single-stream block, two heads whose 16 channels split over the rotary
# axes (index, height, width) as the real 128 do (16, 56, 56). The text streams are the tiny encoders':
# T5's hidden states and CLIP's pooled output (its hidden size, which the pooler keeps).
_T5 = {"d_model": TINY_TEXT_DIM, "d_ff": 2 * TINY_TEXT_DIM, "d_kv": 8, "num_heads": 4, "num_layers": 2,
       "num_decoder_layers": 2}
_FLUX = {
    "text_encoder": _text(2), "text_encoder_2": _T5,
    "transformer": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
                    "axes_dims_rope": [4, 6, 6], "joint_attention_dim": TINY_TEXT_DIM,
                    "pooled_projection_dim": TINY_TEXT_DIM},
    # Four blocks (8x geometry) with the real 16 latent channels and the real 32 norm groups (no tensor shows
    # the group count, so a loader rebuilding the VAE from its tensors assumes the real one): 32 wide
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}}

# Z-Image: two main blocks and one of each refiner, two heads whose 32 channels split over the rotary axes
# (caption index, height, width) as the real 128 do (32, 48, 48). The captions are the tiny Qwen3's hidden
# states; it has three layers, since the transformer reads the second-to-last one.
_ZIMAGE = {
    "text_encoder": {"hidden_size": TINY_TEXT_DIM, "intermediate_size": 2 * TINY_TEXT_DIM, "num_hidden_layers": 3,
                     "max_window_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    "transformer": {"dim": 64, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 1,
                    "axes_dims": [8, 12, 12], "cap_feat_dim": TINY_TEXT_DIM},
    "vae": _FLUX["vae"]}
# Chroma: Flux.1's tiny transformer without CLIP's pooled input; the modulation network keeps its real 64 input
# channels (timestep, guidance and module index embeddings) with a narrow hidden width and two of its five layers.
_CHROMA = {
    "text_encoder": _T5, "vae": _FLUX["vae"],
    "transformer": {**{k: v for k, v in _FLUX["transformer"].items() if k != "pooled_projection_dim"},
                    "approximator_hidden_dim": TINY_TEXT_DIM, "approximator_layers": 2}}
# Qwen-Image: two blocks (the last one's text stream is discarded, unlike the others') of two 16-channel heads
# (rotary axes split as the real 128's 16, 56, 56), reading the hidden states of the tiny captioner's Qwen2.5-VL
# (real vocabulary of 152,064 ids); an autoencoder of the real four levels (8x) at an eighth of the width, one
# residual block each.
_QWEN_VL = tiny_captioners.SIZES["qwen2.5-vl"]
_QWEN_IMAGE = {"text_encoder": _QWEN_VL, "vae": {"base_dim": 12, "num_res_blocks": 1},
               "transformer": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
                               "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 16}}
# FLUX.2 [klein]: one double-stream and one single-stream block, two heads whose 16 channels split over the four
# rotary axes (time, height, width, text index) as the real 128 do (32 each); the text width is three of the tiny
# Qwen3's hidden states side by side. The Qwen3 has 28 layers: the pipeline reads layers 9, 18 and 27, and the
# 27th must be a block's output, not the final norm's as it would be in a 27-layer model. The autoencoder keeps the
# real 32 latent channels and 32 norm groups.
_KLEIN = {
    "text_encoder": {"hidden_size": TINY_TEXT_DIM, "intermediate_size": 2 * TINY_TEXT_DIM, "num_hidden_layers": 28,
                     "max_window_layers": 28, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    "transformer": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
                    "axes_dims_rope": [4, 4, 4, 4], "joint_attention_dim": 3 * TINY_TEXT_DIM},
    "vae": _FLUX["vae"]}

# The size of every component: only these keys differ from the real configs.
SIZES = {
    "sd": {"text_encoder": _text(4), "vae": _VAE, "unet": {**_SD_UNET, "attention_head_dim": 8}},
    "sd21": {"text_encoder": _text(4), "vae": _VAE, "unet": {**_SD_UNET, "attention_head_dim": [2, 4]}},
    "sdxl": {
        "text_encoder": _text(3), "text_encoder_2": _text(3, 2 * TINY_TEXT_DIM), "vae": _VAE,
        "unet": {"sample_size": 8, "layers_per_block": 1, "block_out_channels": [32, 64],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
                 "attention_head_dim": [2, 4], "norm_num_groups": 16,
                 # the hidden states of both encoders side by side, as SDXL's 768 + 1280
                 "cross_attention_dim": 3 * TINY_TEXT_DIM, "addition_time_embed_dim": _TIME_EMBED_DIM,
                 "projection_class_embeddings_input_dim": _TIME_IDS * _TIME_EMBED_DIM + 2 * TINY_TEXT_DIM}},
    "flux": _FLUX, "flux-schnell": _FLUX, "chroma": _CHROMA, "z-image": _ZIMAGE, "qwen-image": _QWEN_IMAGE,
    "flux2-klein": _KLEIN, "qwen-image-edit": _QWEN_IMAGE,
}
# The length of FLUX.1's T5 tokenizer (its tokenizer_2/ folder says 512 for dev and schnell alike) and of
# Chroma's (ChromaPipeline's max_sequence_length).
T5_MAX_LENGTH = 512


def real_config(arch: str, component: str) -> dict:
    folder = REAL_CONFIGS / ARCHITECTURES[arch] / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text(encoding="utf-8"))


def _text_encoder(config: dict, class_name: str):
    """The text encoder of the pipeline's class (model_index.json's: Z-Image's config names Qwen3 with its
    language-model head, Qwen3ForCausalLM, which the pipeline loads without it, as Qwen3Model)."""
    import transformers

    model_class = getattr(transformers, class_name)
    return model_class(model_class.config_class.from_dict(config))


def _shrunk(real: dict, size: dict) -> dict:
    """real with size's values; a nested `*_config` (Qwen2.5-VL's vision tower) keeps its other real values."""
    return {**real, **{key: {**real[key], **value} if key.endswith("_config") else value
                       for key, value in size.items()}}


def _make_tiny_qwen_image(directory: Path, configs: dict, scheduler: dict, index: dict) -> Path:
    import diffusers
    import transformers

    from .qwen_image import text_encoder_from_config

    text_encoder = text_encoder_from_config(configs["text_encoder"])
    # Qwen2.5-VL's tokenizer files, as the tiny captioner's (the pipeline saves them again, in the same place)
    tokenizer_folder = directory / "tokenizer"
    tokenizer_folder.mkdir(exist_ok=True)
    tiny_captioners.qwen_tokenizer_files(tokenizer_folder, tiny_captioners.QWEN_SPECIALS[:22],
                                         tiny_captioners.QWEN_CHAT_TEMPLATE)
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(tokenizer_folder)
    edit = "processor" in index
    pipeline = getattr(diffusers, index["_class_name"])(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=diffusers.AutoencoderKLQwenImage.from_config(configs["vae"]), text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=diffusers.QwenImageTransformer2DModel.from_config(configs["transformer"]),
        **({"processor": None} if edit else {}))
    pipeline.save_pretrained(directory, safe_serialization=True)
    if edit:
        # Qwen-Image-Edit's processor (Qwen2.5-VL's real image preprocessing and the tokenizer), saved part by part:
        # the processor class would save a video processor too, which needs torchvision; the index then names it
        processor = directory / "processor"
        transformers.AutoImageProcessor.from_pretrained(REAL_CONFIGS / ARCHITECTURES["qwen-image-edit"] /
                                                        "processor").save_pretrained(processor)
        tokenizer.save_pretrained(processor)
        (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return directory


def make_tiny_model(directory: str | Path, seed: int = 0, arch: str = "sd") -> Path:
    """Save a tiny random pipeline of the architecture (a key of ARCHITECTURES) in diffusers format; same
    bytes for the same seed."""
    import diffusers
    import torch

    from .qwen3_text import qwen3_tokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = json.loads((REAL_CONFIGS / ARCHITECTURES[arch] / "model_index.json").read_text(encoding="utf-8"))
    configs = {name: _shrunk(real_config(arch, name), size) for name, size in SIZES[arch].items()}
    torch.manual_seed(seed)
    if arch in ("qwen-image", "qwen-image-edit"):
        return _make_tiny_qwen_image(directory, configs, real_config(arch, "scheduler"), index)
    parts = {name: _text_encoder(configs[name], index[name][1]) for name in ("text_encoder", "text_encoder_2")
             if name in configs}
    for name, pad_token in clip_vocab.PAD_TOKENS.get(ARCHITECTURES[arch], {}).items():
        parts[name] = clip_vocab.clip_tokenizer(pad_token)
    if "transformer" in configs:
        transformer_class = getattr(diffusers, configs["transformer"]["_class_name"])
        parts["transformer"] = transformer_class.from_config(configs["transformer"])
        if arch in ("z-image", "flux2-klein"):  # both read a Qwen3's hidden states
            parts["tokenizer"] = qwen3_tokenizer()
        elif "text_encoder_2" in configs:  # FLUX.1: CLIP ViT-L's tokenizer, then T5's
            parts["tokenizer"] = clip_vocab.clip_tokenizer(clip_vocab.END)
            parts["tokenizer_2"] = t5_vocab.t5_tokenizer(T5_MAX_LENGTH)
        else:  # Chroma: T5's alone
            parts["tokenizer"] = t5_vocab.t5_tokenizer(T5_MAX_LENGTH)
    else:
        parts["unet"] = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    parts["vae"] = getattr(diffusers, configs["vae"]["_class_name"]).from_config(configs["vae"])
    if arch == "flux2-klein":
        _latent_statistics(parts["vae"])
    scheduler = real_config(arch, "scheduler")
    parts["scheduler"] = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipeline_class = getattr(diffusers, index["_class_name"])
    if arch == "sdxl":
        pipeline = pipeline_class(**parts, force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"])
    elif arch == "flux2-klein":
        pipeline = pipeline_class(**parts, is_distilled=index["is_distilled"])
    elif "transformer" in parts:
        pipeline = pipeline_class(**parts)
    else:
        pipeline = pipeline_class(**parts, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=index["requires_safety_checker"])
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def _latent_statistics(vae) -> None:
    """FLUX.2's autoencoder ships the statistics of its latents (its batch norm's running mean and variance); a
    fresh one has 0 and 1, which would hide a normalisation left out. Draws them near the real ones' scale."""
    vae.bn.running_mean.normal_(0, 0.5)
    vae.bn.running_var.uniform_(0.5, 4.0)


_COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 210, 40),
            "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
_SHAPES = ("circle", "square", "triangle")
# (width, height): square, landscape and portrait so that bucketing has something to do.
_INSTANCE_SIZES = ((96, 96), (128, 64), (64, 128), (120, 80), (80, 120), (112, 72), (72, 112), (100, 100),
                   (128, 80), (80, 128))


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _draw_subject(draw, cx: int, cy: int, radius: int) -> None:
    # The demo subject "sks toy": a red disc with a yellow square eye, recognisable at any size.
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=_COLOURS["red"])
    eye = max(2, radius // 3)
    draw.rectangle((cx - eye, cy - eye, cx + eye, cy + eye), fill=_COLOURS["yellow"])


def make_sample_data(directory: str | Path, seed: int = 0) -> Path:
    """Write instance/ (the subject), class/ (empty), finetune/ (captioned shapes) and edit/ (an edit model's
    pairs, see make_edit_pairs) under directory."""
    from PIL import Image, ImageDraw

    directory = Path(directory)
    rng = random.Random(seed)
    instance_dir, class_dir, finetune_dir = directory / "instance", directory / "class", directory / "finetune"
    for folder in (instance_dir, class_dir, finetune_dir):
        folder.mkdir(parents=True, exist_ok=True)

    backgrounds = [(200, 220, 240), (230, 230, 210), (210, 240, 210), (240, 215, 225)]
    for index, (width, height) in enumerate(_INSTANCE_SIZES):
        image = Image.new("RGB", (width, height), backgrounds[index % len(backgrounds)])
        draw = ImageDraw.Draw(image)
        radius = min(width, height) // 3
        cx = rng.randint(radius, width - radius)
        cy = rng.randint(radius, height - radius)
        _draw_subject(draw, cx, cy, radius)
        image.save(instance_dir / f"toy_{index:02d}.png")

    colour_names = list(_COLOURS)
    for index in range(32):
        width, height = rng.choice(((96, 96), (128, 80), (80, 128), (112, 64), (64, 112)))
        background = rng.choice(["white", "black"])
        image = Image.new("RGB", (width, height), _COLOURS[background])
        draw = ImageDraw.Draw(image)
        parts = []
        for _ in range(rng.randint(1, 2)):
            shape = rng.choice(_SHAPES)
            colour = rng.choice([c for c in colour_names if c != background])
            size = rng.randint(min(width, height) // 4, min(width, height) // 2)
            x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
            _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), _COLOURS[colour])
            parts.append(f"a {colour} {shape}")
        stem = f"shapes_{index:03d}"
        image.save(finetune_dir / f"{stem}.png")
        caption = " and ".join(parts) + f" on a {background} background"
        (finetune_dir / f"{stem}.txt").write_text(caption, encoding="utf-8")
    make_edit_pairs(directory / "edit", seed)
    return directory


def make_edit_pairs(folder: Path, seed: int = 0) -> Path:
    """Write 8 (control, target) pairs for an edit model into folder (data.controls' layout): `pair_NN.control.png`
    a shape in one colour, `pair_NN.png` the same shape in another, and `pair_NN.txt` the instruction between them
    ("make the circle blue"); square, landscape and portrait sizes, each pair's two images of one size."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = [c for c in _COLOURS if c not in ("white", "black")]
    for index in range(8):
        width, height = ((96, 96), (128, 80), (80, 128))[index % 3]
        shape = rng.choice(_SHAPES)
        before, after = rng.sample(colours, 2)
        size = min(width, height) // 2
        x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
        for colour, name in ((before, f"pair_{index:02d}.control.png"), (after, f"pair_{index:02d}.png")):
            image = Image.new("RGB", (width, height), _COLOURS["white"])
            _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + size, y0 + size), _COLOURS[colour])
            image.save(folder / name)
        (folder / f"pair_{index:02d}.txt").write_text(f"make the {shape} {after}", encoding="utf-8")
    return folder
