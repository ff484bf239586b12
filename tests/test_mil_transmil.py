"""TransMIL known answers: square padding, PPEG, masked Nystrom attention on small bags, default widths."""

from __future__ import annotations

import pytest
import torch

from tests.builders import MIL_IN_DIM, MIL_N_CLASSES, SMALL_MIL_OPTIONS, small_mil_model
from ubc_ocean.mil import create_mil_model
from ubc_ocean.mil.transmil import PPEG, TransLayer, exact_attention, pad_to_square

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize(("n", "side"), [(1, 1), (2, 2), (4, 2), (5, 3), (7, 3), (9, 3), (10, 4), (1000, 32)])
def test_pad_to_square(n: int, side: int) -> None:
    tokens = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(1, n, 3)
    padded, got_side = pad_to_square(tokens)
    assert got_side == side
    assert padded.shape == (1, side * side, 3)
    torch.testing.assert_close(padded[:, :n], tokens)
    add = side * side - n
    torch.testing.assert_close(padded[:, n:], tokens[:, :add])


def test_pad_to_square_seven_repeats_first_two() -> None:
    tokens = torch.randn(1, 7, 4)
    padded, side = pad_to_square(tokens)
    assert (side, padded.shape[1]) == (3, 9)
    assert torch.equal(padded[0, 7], tokens[0, 0]) and torch.equal(padded[0, 8], tokens[0, 1])


def test_ppeg_cls_token_bypasses_convolutions() -> None:
    torch.manual_seed(0)
    ppeg = PPEG(8)
    x = torch.randn(1, 1 + 9, 8)
    out = ppeg(x, 3)
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], x[:, 0])
    # Patch outputs do not depend on the cls token.
    x_other_cls = x.clone()
    x_other_cls[:, 0] += 100.0
    assert torch.equal(ppeg(x_other_cls, 3)[:, 1:], out[:, 1:])
    # Patch outputs are identity + three depthwise convolutions on the 3x3 grid.
    grid = x[:, 1:].transpose(1, 2).reshape(1, 8, 3, 3)
    expected = grid + ppeg.conv7(grid) + ppeg.conv5(grid) + ppeg.conv3(grid)
    torch.testing.assert_close(out[:, 1:], expected.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="PPEG expects"):
        ppeg(torch.randn(1, 9, 8), 3)


def test_ppeg_uses_depthwise_kernels() -> None:
    ppeg = PPEG(16)
    for conv, k in ((ppeg.conv7, 7), (ppeg.conv5, 5), (ppeg.conv3, 3)):
        assert conv.groups == 16 and conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2)


def test_transmil_padding_used_in_forward() -> None:
    """A 7-instance bag runs through PPEG as a 3x3 grid (7 tokens + 2 repeats) plus the cls token."""
    model = small_mil_model("transmil").eval()
    seen: list[tuple[int, ...]] = []
    handle = model.ppeg.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            model(torch.randn(7, MIL_IN_DIM))
    finally:
        handle.remove()
    assert seen == [(1, 10, SMALL_MIL_OPTIONS["transmil"]["hidden_dim"])]


def _exact_attention(layer: TransLayer, x: torch.Tensor) -> torch.Tensor:
    """Full softmax self-attention with the layer's own weights and value residual conv (no Nystrom)."""
    attention = layer.attention
    b, n, _ = x.shape
    qkv = attention.to_qkv(layer.norm(x)).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, attention.heads, -1).transpose(1, 2) for t in qkv)
    out = ((q * attention.scale) @ k.transpose(-1, -2)).softmax(-1) @ v + attention.res_conv(v)
    return x + attention.to_out(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("n", [2, 10, 50])
def test_transmil_small_bags_attend_only_to_real_tokens(n: int) -> None:
    """Below the landmark count, masked Nystrom attention is close to exact attention over the bag;
    the reference's unmasked padding lets 256 - n zero tokens into every softmax and is far off."""
    torch.manual_seed(0)
    layer = TransLayer(64, heads=8, num_landmarks=256, dropout=0.0).eval()
    x = torch.randn(1, n, 64)
    with torch.no_grad():
        exact = _exact_attention(layer, x) - x
        masked = layer(x) - x
        layer.mask_padding = False
        unmasked = layer(x) - x

    def error(out: torch.Tensor) -> float:
        return float((out - exact).norm() / exact.norm())

    assert error(masked) < 0.05 and error(unmasked) > 4 * error(masked)
    assert create_mil_model("transmil", MIL_IN_DIM, MIL_N_CLASSES).config["options"]["mask_padding"] is True


def test_default_attention_follows_the_paper() -> None:
    """8 heads of 64 over hidden 512, 256 landmarks (the paper's TransMIL)."""
    model = create_mil_model("transmil", 1024, 5)
    for layer in (model.layer1, model.layer2):
        attention = layer.attention
        assert (attention.heads, attention.num_landmarks, attention.to_qkv.out_features) == (8, 256, 3 * 512)


def test_hidden_dim_must_be_a_multiple_of_heads() -> None:
    with pytest.raises(ValueError, match="multiple of heads"):
        create_mil_model("transmil", MIL_IN_DIM, MIL_N_CLASSES, hidden_dim=60, heads=8)


def _reference_attention(layer: TransLayer, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention from torch's own kernel (``scaled_dot_product_attention``) with the layer's weights."""
    attention = layer.attention
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, attention.heads, -1).transpose(1, 2) for t in attention.to_qkv(x).chunk(3, dim=-1))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v) + attention.res_conv(v)
    return attention.to_out(out.transpose(1, 2).reshape(b, n, -1))


def test_exact_attention_is_softmax_attention_and_what_nystrom_converges_to() -> None:
    """With one token per landmark and enough pseudo-inverse iterations, Nystrom attention tends to exact
    softmax attention over the same weights; ``exact_attention`` computes that limit directly."""
    torch.manual_seed(0)
    layer = TransLayer(64, heads=8, num_landmarks=32, dropout=0.0).eval()
    x = torch.randn(1, 32, 64)
    with torch.no_grad():
        exact = exact_attention(layer.attention, x)
        torch.testing.assert_close(exact, _reference_attention(layer, x), rtol=1e-4, atol=1e-5)
        layer.attention.pinv_iterations = 30
        nystrom = layer.attention(x)
    assert float((nystrom - exact).norm() / exact.norm()) < 1e-3


def test_short_sequences_take_the_exact_path_long_ones_nystrom() -> None:
    torch.manual_seed(0)
    layer = TransLayer(64, heads=8, num_landmarks=16, dropout=0.0, exact_up_to=16).eval()
    with torch.no_grad():
        short = torch.randn(1, 16, 64)
        torch.testing.assert_close(layer(short), short + exact_attention(layer.attention, layer.norm(short)))
        long = torch.randn(1, 40, 64)
        nystrom = long + layer.attention(layer.norm(long), mask=torch.ones(1, 40, dtype=torch.bool))
        torch.testing.assert_close(layer(long), nystrom)


def test_exact_attention_up_to_defaults_to_the_landmark_count() -> None:
    model = create_mil_model("transmil", MIL_IN_DIM, MIL_N_CLASSES, hidden_dim=64, heads=4)
    layers = (model.layer1.exact_up_to, model.layer2.exact_up_to)
    assert model.config["options"]["exact_attention_up_to"] == 32 and layers == (32, 32)
    never = create_mil_model("transmil", MIL_IN_DIM, MIL_N_CLASSES, hidden_dim=64, heads=4, exact_attention_up_to=0)
    assert never.layer1.exact_up_to == 0
    with pytest.raises(ValueError, match="exact_attention_up_to"):
        create_mil_model("transmil", MIL_IN_DIM, MIL_N_CLASSES, exact_attention_up_to=-1)
