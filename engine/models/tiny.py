"""Offline demo assets: a tiny random Stable Diffusion pipeline and a synthetic dataset.

Nothing here downloads anything. The tiny pipeline keeps SD1.x's structure (CLIP text encoder,
cross-attention UNet with 4 latent channels, a VAE that downsamples 8x) at a size that trains on a CPU.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

TINY_TEXT_DIM = 32
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    # GPT-2/CLIP byte-to-unicode table: every byte maps to a printable character.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# Merges for frequent English fragments so that prompts tokenise to fewer, more meaningful tokens.
_MERGE_WORDS = ("sks", "photo", "red", "blue", "green", "yellow", "circle", "square", "triangle", "star",
                "toy", "a", "of", "on", "and", "with", "the", "background", "purple", "orange", "white",
                "black", "small", "large", "object", "shape", "shapes")


def write_tokenizer(directory: Path) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) built from the byte alphabet."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    known = set(vocab_tokens)
    for word in _MERGE_WORDS:
        # Build each word left to right: ((s k) s</w>) and so on, the way BPE would have learnt it.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in known:
                merges.append(pair)
                vocab_tokens.append(merged)
                known.add(merged)
            symbols = [merged] + symbols[2:]
    vocab_tokens += list(_SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random SD1.x-shaped pipeline in diffusers format; same bytes for the same seed."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = directory / "tokenizer"
    write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=77, pad_token="<|endoftext|>")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM, attention_head_dim=8, norm_num_groups=16)
    # Four blocks give three 2x downsamples: the same 8x image-to-latent geometry as SD's VAE.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, num_train_timesteps=1000,
                              steps_offset=1, prediction_type="epsilon")
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


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
    """Write instance/ (the subject), class/ (empty) and finetune/ (captioned shapes) under directory."""
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
    return directory
