"""Pathology encoder presets: every architecture builds with its options, weight files load through the
registry (timm keys, and transformers ViT/DINOv2 keys converted), and a misfit file is refused."""

from __future__ import annotations

import re

import pytest
import timm
import torch

from ubc_ocean.config import ConfigError
from ubc_ocean.encoders import WeightsMismatchError, create_encoder
from ubc_ocean.encoders.hf_convert import hf_vit_to_timm
from ubc_ocean.encoders.presets import PRESETS, resolved_options
from ubc_ocean.encoders.registry import meta_device

EXPECTED_DIM = {
    "phikon": 768, "phikon_v2": 1024, "lunit_dino_vit_s16": 384, "lunit_dino_vit_s8": 384, "uni": 1024,
    "ctranspath": 768, "h_optimus_0": 1536, "virchow2": 2560,
}


@pytest.fixture(autouse=True)
def private_checksum_cache(tmp_path, monkeypatch):
    """The checkpoints these tests write are hashed into their own cache, not the user's."""
    monkeypatch.setenv("UBC_OCEAN_CACHE", str(tmp_path / "checksum-cache"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_architecture_builds(name):
    preset = PRESETS[name]
    with meta_device():  # shapes only: no memory for the billion-parameter ones
        model = timm.create_model(preset.architecture, pretrained=False, num_classes=0, **resolved_options(preset))
    width = model.num_features * (2 if preset.pooling == "cls_mean" else 1)
    assert width == EXPECTED_DIM[name]
    assert preset.input_size == 224 and len(preset.mean) == len(preset.std) == 3
    assert tuple(model.patch_embed.img_size) == (224, 224)  # the published weights' position grid


def test_vit_preset_at_another_input_size_interpolates_its_positions(tmp_path):
    preset = PRESETS["lunit_dino_vit_s16"]
    source = timm.create_model(preset.architecture, pretrained=False, num_classes=0, **resolved_options(preset))
    path = tmp_path / "lunit.pth"
    torch.save(source.state_dict(), path)
    encoder = create_encoder("lunit_dino_vit_s16", weights=path, input_size=112)
    tiles = torch.randint(0, 255, (2, 112, 112, 3), dtype=torch.uint8)
    with torch.inference_mode():
        features = encoder.model(encoder.preprocess(tiles))
    assert encoder.input_size == 112 and features.shape == (2, 384) and torch.isfinite(features).all()
    with pytest.raises(ConfigError, match="224 px input only"):
        create_encoder("ctranspath", weights=path, input_size=112)


def test_preset_without_weights_says_where_to_get_them():
    with pytest.raises(ValueError, match=re.escape("huggingface.co/MahmoodLab/UNI")):
        create_encoder("uni")


def test_ctranspath_preset_loads_a_weights_file_and_embeds(tmp_path):
    preset = PRESETS["ctranspath"]
    source = timm.create_model(preset.architecture, pretrained=False, num_classes=0, **resolved_options(preset))
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # wrapped + prefixed
    encoder = create_encoder("ctranspath", weights=path, prefix_map={"module.": ""})
    tiles = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        got = encoder.model(encoder.preprocess(tiles))
        want = source.eval()(encoder.preprocess(tiles))
    assert got.shape == (2, 768) and torch.allclose(got, want, atol=1e-5)


def _timm_to_hf(state: dict, layer_scale: bool) -> dict:
    """The inverse mapping, written independently: how transformers lays out a timm ViT's tensors."""
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("norm."):
            out["layernorm." + key.rsplit(".", 1)[1]] = value
        else:
            block, rest = re.match(r"blocks\.(\d+)\.(.*)", key).groups()
            base = f"encoder.layer.{block}."
            if rest.startswith("attn.qkv."):
                for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    out[f"{base}attention.attention.{part}.{rest.rsplit('.', 1)[1]}"] = chunk
                continue
            names = {"norm1": "norm1" if layer_scale else "layernorm_before",
                     "norm2": "norm2" if layer_scale else "layernorm_after",
                     "attn.proj": "attention.output.dense",
                     "mlp.fc1": "mlp.fc1" if layer_scale else "intermediate.dense",
                     "mlp.fc2": "mlp.fc2" if layer_scale else "output.dense",
                     "ls1": "layer_scale1", "ls2": "layer_scale2"}
            stem, leaf = rest.rsplit(".", 1)
            out[base + names[stem] + "." + ("lambda1" if leaf == "gamma" else leaf)] = value
    out["pooler.dense.weight"] = torch.zeros(1)  # ViTModel's pooler: dropped on conversion
    return out


@pytest.mark.parametrize("layer_scale", [False, True], ids=["vitmodel", "dinov2model"])
def test_transformers_layout_converts_to_timm(layer_scale):
    options = {"depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 0}
    if layer_scale:
        options["init_values"] = 0.5
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **options).eval()
    hf = _timm_to_hf(model.state_dict(), layer_scale)
    hf = {f"vit.{k}": v for k, v in hf.items()}
    if layer_scale:
        hf["embeddings.mask_token"] = torch.zeros(1, 64)
    converted = hf_vit_to_timm(hf)
    assert set(converted) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(converted[key], value), key


def test_truncated_weights_file_is_refused_with_key_list(tmp_path):
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    state = model.state_dict()
    del state["blocks.3.attn.qkv.weight"]
    state["blocks.3.attn.extra"] = torch.zeros(1)
    path = tmp_path / "lunit.pth"
    torch.save(state, path)
    expected = r"missing keys \[blocks\.3\.attn\.qkv\.weight\].*unexpected keys \[blocks\.3\.attn\.extra\]"
    with pytest.raises(WeightsMismatchError, match=expected):
        create_encoder("lunit_dino_vit_s16", weights=path)


def test_cache_name_is_known_without_building_the_model(tmp_path):
    from ubc_ocean.encoders.registry import encoder_cache_name

    path = tmp_path / "lunit.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict(), path)
    for name, weights, size in [("efficientnet_lite0", None, None), ("efficientnet_lite0", None, 96),
                                ("lunit_dino_vit_s16", path, None)]:
        built = create_encoder(name, weights=weights, input_size=size)
        assert encoder_cache_name(name, weights, size) == built.cache_name
