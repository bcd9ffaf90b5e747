"""Setting up what a run trains from its plan: which parameters train, the memory features, the
optimizer. The trainer calls these on the loaded models, the VRAM estimator on fake ones."""
from __future__ import annotations

import torch

from . import block_swap
from .config import Config
from .models.family import never_trained_parts, text_encoder_parts
from .models.sd import Components, enable_text_encoder_checkpointing, enable_xformers_if_usable
from .plan import RunPlan


def cast_(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating-point weights in place, keeping the parameter objects (Module.to() swaps them for
    tensor subclasses such as the estimator's fake tensors, which those refuse)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return module


def prepare_models(family, components: Components, config: Config, plan: RunPlan, device: torch.device) -> str:
    """Freeze what is not trained, switch on the memory features, move to the device, add the adapter of
    an adapter run. Returns the attention backend in use."""
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    trained = trained_parts(components, plan)
    vae.requires_grad_(False)
    # The frozen VAE encodes one image at a time: a batch of 1024 px images at once holds GiBs of
    # activations, and nothing is gained since no gradient flows through it.
    vae.enable_slicing()
    text_encoder.requires_grad_(False)
    unet.train()
    text_encoder.eval()
    vae.eval()
    for name, model in trained.items():
        if name != "unet":
            model.requires_grad_(True)
            model.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing(
            offloaded_checkpoint(device) if config.memory.offload_activations else None)
        for name, model in trained.items():
            if name != "unet":
                enable_text_encoder_checkpointing(model)
    attention = enable_xformers_if_usable(unet, config.xformers)
    # the swapped blocks stay in system memory: the device never holds the whole model
    swapped = block_swap.swapped_blocks(unet, config.memory.blocks_on_cpu)
    for model in (unet, text_encoder, vae):
        if model is unet and plan.sharded:
            continue  # sharding.shard moves it to the device shard by shard
        if model is unet and swapped:
            block_swap.move_except(unet, swapped, device)
        elif next(model.parameters()).device != device:  # (fake tensors refuse even a move to where they are)
            model.to(device)
    for model in trained.values():
        cast_(model, plan.weights)  # weights_dtype applies to the trained models; frozen ones stay fp32
    if plan.adapter != "full":
        from .models.adapters import add_adapter

        for component, model in trained.items():
            add_adapter(model, component, config.network, config.seed or 0)
    if config.base_dtype != "fp32":
        from .base_weights import STORAGE, store_frozen

        # an adapter's base and the frozen text encoders; a fully trained model and the VAE keep theirs
        based = [model for model in trained.values() if plan.adapter != "full"]
        for model in based + [m for name, m in text_encoder_parts(text_encoder).items() if name not in trained]:
            store_frozen(model, STORAGE[config.base_dtype])
    if plan.train_text_encoder:
        # Layers CLIP skip never runs: freezing them keeps DDP from waiting for their gradients and the
        # optimizer from keeping state for them.
        for module in family.unused_text_modules(text_encoder, config.clip_stop_at_layer):
            module.requires_grad_(False)
    # after the adapter and the stored weights, whose tensors are the ones that move
    if swapped:  # the swap and its placement log, kept with the model they move
        unet.block_swap = block_swap.apply(unet, config.memory.blocks_on_cpu, device,
                                           stays_trained=plan.adapter != "full")
    return attention


def offloaded_checkpoint(device: torch.device, hooks=None):
    """Gradient checkpointing whose saved block inputs wait in system memory (pinned on a GPU) between forward
    and backward: the non-reentrant checkpoint keeps only a block's tensor inputs, saved through autograd's
    saved-tensor hooks, which save_on_cpu moves off the device. `hooks` makes other saved-tensor hooks in its
    place (the estimator's, which count what is offloaded)."""
    pin = device.type == "cuda"
    hooks = hooks or (lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))

    def checkpoint(module, *args):
        with hooks():
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
    return checkpoint


def trained_parts(components: Components, plan: RunPlan) -> dict[str, torch.nn.Module]:
    """The models that train, by component name (what an adapter run adapts): the UNet (or transformer) and
    the trained text encoders, less those the family never trains."""
    encoders = text_encoder_parts(components.text_encoder)
    never = never_trained_parts(components.text_encoder)
    return {"unet": components.unet, **{name: model for name, model in encoders.items()
                                        if name in plan.trained_text_encoders and name not in never}}


def trained_models(components: Components, plan: RunPlan) -> list[torch.nn.Module]:
    return list(trained_parts(components, plan).values())


def frozen_models(components: Components, plan: RunPlan) -> list[torch.nn.Module]:
    """The VAE and the text encoders that do not train."""
    trained = trained_parts(components, plan)
    return [components.vae] + [model for name, model in text_encoder_parts(components.text_encoder).items()
                               if name not in trained]


def parameter_groups(components: Components, plan: RunPlan, config, lr: float) -> list[dict]:
    """The trained parameters as optimizer groups: the UNet's at lr, the text encoder's at
    network.text_encoder_lr (scaled as lr is) when set."""
    groups = []
    for name, model in trained_parts(components, plan).items():
        params = [p for p in model.parameters() if p.requires_grad]
        group_lr = lr
        if name != "unet" and config is not None and config.network.text_encoder_lr:
            group_lr = lr * config.network.text_encoder_lr / config.optimizer.params.lr
        groups.append({"params": params, "lr": group_lr})
    return groups


def build_optimizer(config: Config, plan: RunPlan, groups: list[dict], seed: int = 0):
    """Training's optimizer over parameter groups. Fused backward and bf16 weights need one optimizer per
    parameter, whose learning rate a schedule drives through its placeholder `proxy`."""
    from . import optim

    if plan.per_parameter:
        return optim.PerParameterOptimizer(config.optimizer, groups, fused=plan.fused_backward,
                                           bf16_weights=plan.rounded_weights, seed=seed,
                                           clip_norm=config.trainer.gradient_clip_val)
    return optim.build_optimizer(config.optimizer, groups, groups[0]["lr"])


def build_schedule(config: Config, optimizer, total_steps: int):
    from . import optim

    return optim.build_scheduler(config.optimizer, getattr(optimizer, "proxy", optimizer), total_steps)
