"""Ready configurations for the pathology encoders the top UBC-OCEAN teams used.

Each preset names a timm architecture with the constructor options its published weights need, the
input size and normalisation it was trained with, how to pool its tokens, and where the weights live.
Weights are never downloaded at run time: fetch the file once (README, "Pathology encoders"), then set
``features.encoder: <preset>`` and ``features.weights: <path>``. With internet, ``features.weights:
hub`` lets timm fetch the ``hf_hub`` repository (the gated ones need a Hugging Face token).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class EncoderPreset:
    """A timm architecture plus everything its published weights expect."""

    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hf_hub: str
    weights_file: str  # the file to download from ``hf_hub`` (or the authors' release)
    options: Mapping = field(default_factory=dict)
    pooling: str = "default"  # default: timm's pooled output (a ViT's cls token) | cls_mean: cls + mean patch
    key_format: str = "timm"  # timm | hf_vit (transformers ViTModel / Dinov2Model: converted on load)


@dataclass(frozen=True)
class ClassRef:
    """A class named by its module and attribute, imported only when the model is built: a preset stays
    plain data that neither imports torch nor timm (``tests/test_architecture.py``)."""

    module: str
    name: str

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.name)


# Options that need classes name them (ClassRef) and are resolved when the model is built.
PRESETS: dict[str, EncoderPreset] = {
    "phikon": EncoderPreset(
        "vit_base_patch16_224", 224, IMAGENET_MEAN, IMAGENET_STD, "owkin/phikon", "pytorch_model.bin",
        key_format="hf_vit",
    ),
    "phikon_v2": EncoderPreset(
        "vit_large_patch16_224", 224, IMAGENET_MEAN, IMAGENET_STD, "owkin/phikon-v2", "model.safetensors",
        options={"init_values": 1e-5}, key_format="hf_vit",
    ),
    "lunit_dino_vit_s16": EncoderPreset(
        "vit_small_patch16_224", 224, LUNIT_MEAN, LUNIT_STD, "1aurent/vit_small_patch16_224.lunit_dino",
        "model.safetensors",
    ),
    "lunit_dino_vit_s8": EncoderPreset(
        "vit_small_patch8_224", 224, LUNIT_MEAN, LUNIT_STD, "1aurent/vit_small_patch8_224.lunit_dino",
        "model.safetensors",
    ),
    "uni": EncoderPreset(
        "vit_large_patch16_224", 224, IMAGENET_MEAN, IMAGENET_STD, "MahmoodLab/UNI", "pytorch_model.bin",
        options={"init_values": 1e-5, "dynamic_img_size": True},
    ),
    "ctranspath": EncoderPreset(
        "swin_tiny_patch4_window7_224", 224, IMAGENET_MEAN, IMAGENET_STD,
        "1aurent/swin_tiny_patch4_window7_224.CTransPath", "model.safetensors",
        options={"embed_layer": ClassRef("ubc_ocean.encoders.convstem", "ConvStem")},
    ),
    "h_optimus_0": EncoderPreset(
        "vit_giant_patch14_reg4_dinov2", 224, HOPTIMUS_MEAN, HOPTIMUS_STD, "bioptimus/H-optimus-0",
        "pytorch_model.bin", options={"init_values": 1e-5, "dynamic_img_size": False, "img_size": 224},
    ),
    "virchow2": EncoderPreset(
        "vit_huge_patch14_224", 224, IMAGENET_MEAN, IMAGENET_STD, "paige-ai/Virchow2", "pytorch_model.bin",
        options={"init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True,
                 "mlp_layer": ClassRef("timm.layers", "SwiGLUPacked"),
                 "act_layer": ClassRef("torch.nn", "SiLU"), "reg_tokens": 4,
                 "no_embed_class": True},
        pooling="cls_mean",
    ),
}


def resolved_options(preset: EncoderPreset) -> dict:
    """The preset's timm options with class-valued entries resolved."""
    return {key: value.load() if isinstance(value, ClassRef) else value for key, value in preset.options.items()}
