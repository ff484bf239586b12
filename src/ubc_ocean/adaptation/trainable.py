"""What of the encoder trains (``adapt.trainable``): LoRA adapters, the last blocks, or every weight.

The encoder's timm module is found under a token-pooling wrapper (a pathology preset's ``.model``). Its
``blocks`` are a ViT's transformer blocks or a CNN's stages; the modules after them (a ViT's final norms, a
CNN's head convolution and its batch norm) train with the last block.
"""

from __future__ import annotations

from torch import nn

from .lora import add_lora, is_vit, merged_encoder

FINAL_MODULES = ("norm", "fc_norm", "conv_head", "bn2", "head_drop")


def timm_module(encoder_model: nn.Module) -> nn.Module:
    """The timm model inside the encoder (a preset's pooling wrapper holds it as ``.model``)."""
    inner = getattr(encoder_model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "blocks") else encoder_model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The timm model's blocks, first to last (a ``ValueError`` for a model without ``blocks``)."""
    found = getattr(timm_module(model), "blocks", None)
    if not isinstance(found, nn.Sequential | nn.ModuleList) or len(found) == 0:
        raise ValueError(f"{type(model).__name__} has no blocks to unfreeze (a timm ViT or EfficientNet-like CNN)")
    return list(found)


def final_modules(model: nn.Module) -> list[nn.Module]:
    """The modules after the last block (final norms, head convolution)."""
    inner = timm_module(model)
    return [module for name in FINAL_MODULES if isinstance(module := getattr(inner, name, None), nn.Module)]


def freeze(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def unfreeze_last(model: nn.Module, count: int) -> None:
    """Train the last ``count`` blocks and the modules after them (the rest as they were)."""
    for module in [*blocks(model)[-int(count):], *final_modules(model)]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)


def make_trainable(encoder_model: nn.Module, adapt: dict) -> nn.Module | None:
    """Set what trains per ``adapt.trainable`` (in place); returns the peft model for ``lora`` (whose
    :func:`~ubc_ocean.adaptation.lora.merged_encoder` folds the adapters back), else ``None``."""
    mode = adapt["trainable"]
    inner = timm_module(encoder_model)
    if mode == "lora":
        freeze(encoder_model)
        return add_lora(inner, rank=adapt["lora_rank"], alpha=adapt["lora_alpha"], dropout=adapt["lora_dropout"],
                        last_stages=adapt["lora_last_stages"])  # injected in place: the wrapper sees the adapters
    if mode == "last_blocks":
        freeze(encoder_model)
        unfreeze_last(encoder_model, adapt["last_blocks"])
    elif mode == "full":
        for parameter in encoder_model.parameters():
            parameter.requires_grad_(True)
    else:
        raise ValueError(f"unknown adapt.trainable {mode!r}")
    return None


def plain_timm_module(encoder_model: nn.Module, peft_model: nn.Module | None) -> nn.Module:
    """The timm model to save: LoRA merged into the weights when ``peft_model`` is given."""
    if peft_model is not None:
        return merged_encoder(peft_model)
    return timm_module(encoder_model)


__all__ = ["blocks", "final_modules", "freeze", "is_vit", "make_trainable", "plain_timm_module", "timm_module",
           "unfreeze_last"]
