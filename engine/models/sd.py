"""The SD1.x/SD2.x model family: loading the diffusers components a run trains, encoding prompts with CLIP
skip, the UNet's prediction and the sampling pipeline."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import block_swap, paths
from ..errors import UserError
from .base_family import Family


@dataclass
class Components:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    model_path: str


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet").is_dir()


def resolve_model_path(model: str, sha256: Optional[str] = None) -> str:
    """The local folder or file `model` names: a local path (which always wins), an https URL of a
    .safetensors file, or a Hugging Face Hub id (org/name[@revision][/path/file.safetensors]), the last two
    downloaded once into their caches (engine.hub). sha256 is the config's model_sha256, checked for a
    single file."""
    from .. import hub

    if not model:
        raise UserError("config key 'model': no base model given (a diffusers folder, a .safetensors file, a "
                        "Hugging Face Hub id or demo:tiny-sd)")
    if hub.is_url(model):
        return hub.download_url(model, sha256)
    resolved = paths.resolve(model)
    path = Path(resolved)
    if not path.exists():
        ref = hub.parse_hub_id(model)
        if ref is None:
            raise UserError(f"config key 'model': not found: {resolved}")
        resolved = hub.download_hub(ref, sha256, shown=resolved)
        path = Path(resolved)
    elif sha256 and path.is_file():
        hub.check_sha256(path, sha256, remove=False)
    if path.is_dir() and not is_diffusers_folder(path):
        raise UserError(f"config key 'model': {resolved} is not a diffusers model folder (no model_index.json)")
    return resolved


# The files a CLIP tokenizer is read from: either set is enough.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def load_tokenizer(location, key: str):
    """The CLIP tokenizer in a folder. From a folder without its files transformers builds a tokenizer that
    knows two tokens and raises nothing, so the files are checked first; key is the config key to name."""
    from transformers import CLIPTokenizer

    folder = Path(location)
    if not any(all((folder / name).is_file() for name in files) for files in TOKENIZER_FILES):
        raise UserError(f"config key '{key}': {folder} holds no CLIP tokenizer (tokenizer.json, or vocab.json and "
                        "merges.txt); point it at a model's tokenizer folder")
    return CLIPTokenizer.from_pretrained(str(folder))


def load_components(model: str, vae: Optional[str] = None, tokenizer: Optional[str] = None,
                    dtypes: Optional[dict] = None) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the training noise schedule on the CPU, each model in its
    dtype in `dtypes` (by component name; fp32 where not given)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_path = resolve_model_path(model)
    if Path(model_path).is_file():
        from .single_file import load_single_file_components
        return load_single_file_components(model_path, vae=vae, tokenizer=tokenizer)
    root = Path(model_path)
    tokenizer_path = paths.resolve(tokenizer) if tokenizer else str(root / "tokenizer")
    vae_path = paths.resolve(vae) if vae else str(root / "vae")
    for label, location in (("tokenizer", tokenizer_path), ("vae", vae_path)):
        if not Path(location).exists():
            raise UserError(f"config key '{label if location != str(root / label) else 'model'}': "
                            f"not found: {location}")
    # fp32 whatever the files hold, unless the run stores a model in less: many published models store fp16
    # weights, and training keeps fp32 master weights (mixed precision comes from autocast or weights_dtype).
    dtype = {name: torch.float32 for name in ("unet", "text_encoder", "vae")} | (dtypes or {})
    return Components(
        tokenizer=load_tokenizer(tokenizer_path, "tokenizer" if tokenizer else "model"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype["text_encoder"]),
        vae=AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype["vae"]),
        unet=UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype["unet"]),
        noise_scheduler=DDPMScheduler.from_pretrained(root / "scheduler"),
        model_path=model_path,
    )


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel; older versions nest it under .text_model.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_prompt(text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int = 1,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP skip as in the NovelAI/A1111 convention: hidden_states[-N] then the final layer norm."""
    if clip_stop_at_layer <= 1:
        return text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
    output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    # Under DistributedDataParallel the layer norm sits on the wrapped module.
    return final_layer_norm(getattr(text_encoder, "module", text_encoder))(output.hidden_states[-clip_stop_at_layer])


def enable_text_encoder_checkpointing(text_encoder) -> None:
    # transformers 5 renamed the switch; older versions only have gradient_checkpointing_enable.
    enable = getattr(text_encoder, "activation_checkpointing_enable", None) or \
        text_encoder.gradient_checkpointing_enable
    enable()


def enable_xformers_if_usable(unet, wanted: bool) -> str:
    """Return the attention backend used: 'xformers' only when importable and on CUDA, else torch SDPA."""
    if wanted and torch.cuda.is_available():
        try:
            import xformers  # noqa: F401
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception:  # any import or kernel failure falls back to SDPA
            pass
    return "sdpa"


class StableDiffusion(Family):
    """SD1.x and SD2.x: one CLIP text encoder whose hidden states (CLIP skip applied) condition the UNet."""
    name = "sd"
    conditioning_parts = ("encoder_hidden_states",)
    supports_custom_embeddings = True

    def load(self, config) -> Components:
        from .family import configure_noise_schedule

        from ..ram import load_dtype

        components = load_components(config.model, config.vae, config.tokenizer,
                                     {name: load_dtype(config, name) for name in ("unet", "text_encoder", "vae")})
        configure_noise_schedule(components, config)
        return components

    def objective(self, config, scheduler):
        from ..objectives import Diffusion

        return Diffusion(config, scheduler)

    def fake_components(self, config, architecture) -> Components:
        """The architecture's models, built under the caller's FakeTensorMode: shapes, no weights."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from .family import configure_noise_schedule

        components = Components(
            tokenizer=None, text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(architecture.text_encoder)),
            vae=AutoencoderKL.from_config(architecture.vae),
            unet=UNet2DConditionModel.from_config(architecture.unet),
            noise_scheduler=DDPMScheduler.from_config(architecture.scheduler), model_path=architecture.source)
        configure_noise_schedule(components, config)
        return components

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict:
        return {"encoder_hidden_states": encode_prompt(text_encoder, input_ids, clip_stop_at_layer)}

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]:
        # CLIP skip N never runs the last N - 1 layers
        layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
        return list(layers[len(layers) - clip_stop_at_layer + 1:]) if clip_stop_at_layer > 1 else []

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        return unet(noisy_latents, timesteps, conditioning["encoder_hidden_states"]).sample

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """StableDiffusionPipeline over the given (trained) UNet and text encoder, sampling with DDIM."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            unet=unet, vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer,
            scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    def render(self, pipeline, positive: dict, negative: dict, **options) -> list:
        return pipeline(prompt_embeds=positive["encoder_hidden_states"],
                        negative_prompt_embeds=negative["encoder_hidden_states"], **options).images
