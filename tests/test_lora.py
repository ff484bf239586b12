"""LoRA on timm encoders (issue 27): the targeted layers, the trainable count, and a merge that needs no peft."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ubc_ocean.adaptation.lora import add_lora, expected_trainable, lora_targets, merged_encoder, trainable_parameters


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=0).eval()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()


def trained_adapters(adapted: nn.Module) -> None:
    """Give every adapter a non-zero update (B starts at zero: the merge would otherwise be trivially W)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize(("build", "size", "expected_targets"), [
    (tiny_vit, 32, {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                    "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"}),
    (tiny_cnn, 64, None),
])
def test_lora_adapts_only_its_targets_and_merges_into_a_plain_timm_model(build, size, expected_targets, tmp_path):
    model = build()
    original_keys = set(model.state_dict())
    targets = lora_targets(model)
    if expected_targets is not None:  # the ViT: qkv, proj, fc1, fc2 of each block; never patch_embed.proj
        assert set(targets) == expected_targets
    else:  # the CNN: the 1x1 convolutions of the last two stages only
        assert targets and all(name.split(".")[1] in ("5", "6") for name in targets)
        assert {name.rsplit(".", 1)[-1] for name in targets} == {"conv_pw", "conv_pwl"}
    rank = 4
    count = expected_trainable(model, targets, rank)
    adapted = add_lora(model, rank=rank, alpha=8)
    assert trainable_parameters(adapted) == count  # rank x (in + out) per targeted layer, nothing else
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n)
    assert not any("patch_embed" in n for n, p in adapted.named_parameters() if p.requires_grad)

    trained_adapters(adapted)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        wrapped = adapted(x)
    plain = merged_encoder(adapted).eval()
    assert type(plain) is type(build())  # a plain timm model: no peft module left in it
    assert not any("lora" in name for name, _ in plain.named_modules())
    assert set(plain.state_dict()) == original_keys
    with torch.no_grad():
        torch.testing.assert_close(plain(x), wrapped, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(build()(x), wrapped, atol=1e-4)  # the adapters changed the encoder

    path = tmp_path / "model.safetensors"  # saved and reloaded with timm alone
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    fresh = build()
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), wrapped, rtol=1e-5, atol=1e-5)


def test_a_model_of_another_family_is_refused():
    with pytest.raises(ValueError, match="neither"):
        lora_targets(nn.Sequential(nn.Linear(3, 3)))
