"""LoRA adapters on a timm encoder through peft, merged back into plain weights before saving.

LoRA (Hu et al., 2021) keeps each targeted weight ``W`` frozen and trains two small matrices per layer,
``W' = W + (alpha / rank) B @ A`` (``A``: rank x in, ``B``: out x rank, ``B`` starting at zero, so the adapted
encoder starts as the original). What is targeted:

- a ViT (timm ``VisionTransformer``-like: ``blocks`` and a ``patch_embed``): the attention's ``qkv`` and
  ``proj`` and the MLP's ``fc1`` and ``fc2`` of every block, never the patch embedding (whose convolution is
  also named ``proj``) nor the head;
- a CNN (timm's EfficientNet / MobileNet family: ``blocks`` of stages): the pointwise (1x1) convolutions of
  the last ``last_stages`` stages, where the features are most specific to the training images.

:func:`merged_encoder` folds the adapters into the weights and returns the plain timm module, so the saved
weights load into ``timm.create_model`` with no LoRA library (inference and the Kaggle bundle never need peft).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def is_vit(model: nn.Module) -> bool:
    """A timm vision transformer: transformer ``blocks`` after a ``patch_embed``."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def lora_targets(model: nn.Module, last_stages: int = 2) -> list[str]:
    """The full names of the modules LoRA adapts (see the module's notes); a ``ValueError`` for a model of
    neither family, or one where nothing matches."""
    if is_vit(model):
        names = [name for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name.startswith("blocks.") and name.endswith(VIT_TARGETS)]
    elif isinstance(getattr(model, "blocks", None), nn.Sequential):
        stages = len(model.blocks)
        first = max(0, stages - int(last_stages))
        names = [name for name, module in model.named_modules()
                 if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
                 and name.startswith("blocks.") and int(name.split(".")[1]) >= first]
    else:
        raise ValueError(f"LoRA targets a timm ViT (blocks, patch_embed) or a CNN of stages (blocks); "
                         f"{type(model).__name__} is neither")
    if not names:
        raise ValueError(f"no layer of {type(model).__name__} to adapt with LoRA")
    return names


def expected_trainable(model: nn.Module, targets: Iterable[str], rank: int) -> int:
    """LoRA's trainable parameter count for ``targets``: ``rank x (in + out)`` per layer (a Linear's
    features, a 1x1 convolution's channels)."""
    modules = dict(model.named_modules())
    total = 0
    for name in targets:
        module = modules[name]
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        else:
            total += rank * (module.in_channels + module.out_channels)
    return total


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             last_stages: int = 2) -> nn.Module:
    """``model`` wrapped by peft with LoRA adapters on :func:`lora_targets`; only the adapters train (every
    original weight frozen)."""
    from peft import LoraConfig, get_peft_model  # the ``adapt`` extra

    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=lora_targets(model, last_stages), bias="none")
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters require gradients."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def merged_encoder(adapted: nn.Module) -> nn.Module:
    """The plain timm module with every adapter folded into its weights (``W + (alpha / rank) B @ A``), its
    parameters trainable again as in any timm model; its state dict has the original model's keys."""
    plain = adapted.merge_and_unload()
    for parameter in plain.parameters():
        parameter.requires_grad_(True)
    return plain
