"""Which captioner a folder holds, and the natural-language ones, run through transformers.

A folder is a WD14 tagger (see `tagger`) or a transformers model whose config.json `model_type` is one of
`KINDS`: Qwen2.5-VL, Qwen3-VL, Florence-2 (transformers' own Florence2 classes, so a converted `-hf`
checkpoint, never remote code) or LLaVA (JoyCaption). Captions are decoded greedily (one beam, no sampling)
from `prompt`: a chat turn with the image for the chat models, a task token for Florence-2. Special tokens are
dropped and runs of whitespace (line breaks too) become one space: a caption file holds one line.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from . import tagger
from .options import CaptionOptions, PREFIX

# config.json model_type: (captioner kind, model class name in transformers, default prompt)
KINDS = {
    "qwen2_5_vl": ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "Describe this image in detail."),
    "qwen3_vl": ("qwen3-vl", "Qwen3VLForConditionalGeneration", "Describe this image in detail."),
    "florence2": ("florence2", "Florence2ForConditionalGeneration", "<MORE_DETAILED_CAPTION>"),
    "llava": ("joycaption", "LlavaForConditionalGeneration",
              "Write a long descriptive caption for this image in a formal tone."),
}
# JoyCaption's system turn, as its model card prompts it.
JOYCAPTION_SYSTEM = "You are a helpful image captioner."
# What a Hub download fetches: configs, tokenizer and chat-template files, safetensors weights, a tagger's files.
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors", tagger.MODEL_FILE, tagger.TAGS_FILE]


def resolve(model: str) -> Path:
    """The local folder of `model`: a folder as given, or a Hub id downloaded once into the cache."""
    from .. import hub, paths

    if not model:
        raise UserError(f"{PREFIX} option 'model': a captioning model (a folder or a Hugging Face Hub id) is required")
    local = Path(paths.resolve(model))
    if local.exists():
        if not local.is_dir():
            raise UserError(f"{PREFIX} option 'model': {local} is not a folder")
        return local
    ref = hub.parse_hub_id(model)
    if ref is None or ref.file:
        raise UserError(f"{PREFIX} option 'model': not found: {model} (no such folder, nor a Hugging Face Hub id)")
    return Path(hub.download_hub(ref, patterns=HUB_PATTERNS))


def kind_of(folder: Path) -> str:
    """The captioner kind of a model folder ("wd14" or one of KINDS' kinds); refused in one line otherwise."""
    if tagger.is_tagger(folder):
        return "wd14"
    model_type = None
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        pass
    if model_type not in KINDS:
        known = ", ".join(KINDS)
        raise UserError(f"{PREFIX} option 'model': {folder} is no captioning model this engine knows: expected a "
                        f"config.json whose model_type is one of {known}, or {tagger.MODEL_FILE} with "
                        f"{tagger.TAGS_FILE} (a WD14 tagger); found model_type {model_type!r}")
    return KINDS[model_type][0]


def load(options: CaptionOptions, device):
    """The captioner of options.model on device: a `tagger.Tagger` or a `VisionLanguageCaptioner`."""
    folder = resolve(options.model)
    kind = kind_of(folder)
    if kind == "wd14":
        return tagger.Tagger(folder, options.general_threshold, options.character_threshold,
                             use_gpu=device.type == "cuda")
    return VisionLanguageCaptioner(folder, options, device)


def processor(folder: Path, class_name: str):
    """The model's processor, made from its parts: its tokenizer, its image processor (the PIL one when
    torchvision is missing), its chat template and processor_config.json, and no video processor, which
    would need torchvision and is never used on images."""
    import transformers

    cls = getattr(transformers, class_name)
    parts = {}
    for name in cls.get_attributes():
        if "tokenizer" in name:
            parts[name] = transformers.AutoTokenizer.from_pretrained(folder)
        elif name == "image_processor":
            parts[name] = transformers.AutoImageProcessor.from_pretrained(folder)
    settings = _json(folder / "processor_config.json")
    settings.pop("processor_class", None)
    template = folder / "chat_template.jinja"
    if template.is_file():
        settings["chat_template"] = template.read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        settings["chat_template"] = _json(folder / "chat_template.json")["chat_template"]
    return images_only(cls)(**parts, **settings)


def images_only(cls):
    """The processor class, accepting None for the sub-processors it is not given (the video processor)."""

    class ImagesOnly(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            # the base check looks the expected class up, which needs torchvision for a video processor
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = cls.__name__
    return ImagesOnly


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class VisionLanguageCaptioner:
    """A transformers vision-language model and its processor, captioning a batch of PIL images at once."""

    def __init__(self, folder: Path, options: CaptionOptions, device):
        import torch
        import transformers

        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"]
        self.kind, class_name, default_prompt = KINDS[model_type]
        self.prompt = options.prompt or default_prompt
        self.max_new_tokens = options.max_new_tokens
        self.device = device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.processor = processor(folder, class_name.replace("ForConditionalGeneration", "Processor"))
        # batched prompts of different lengths end where generation starts
        self.processor.tokenizer.padding_side = "left"
        self.model = getattr(transformers, class_name).from_pretrained(folder, dtype=dtype).to(device).eval()

    def inputs(self, images: list):
        """The processor's batch for images: the model's prompt once per image."""
        if self.kind == "florence2":
            return self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt")
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        if self.kind == "joycaption":
            turns.insert(0, {"role": "system", "content": JOYCAPTION_SYSTEM})
        text = self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return self.processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")

    def caption(self, images: list) -> list[str]:
        import torch

        batch = self.inputs(images).to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            generated = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if not self.model.config.is_encoder_decoder:
            generated = generated[:, batch["input_ids"].shape[1]:]  # the prompt is echoed before the answer
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]
