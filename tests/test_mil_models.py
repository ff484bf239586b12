"""MIL model registry, ABMIL, TransMIL and mean-pool baseline: shapes, gradients, determinism, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ubc_ocean.mil import MILModel, available_models, create_mil_model
from ubc_ocean.mil.registry import mil_model_from_config, model_options
from ubc_ocean.mil.transmil import PPEG, TransLayer, pad_to_square

pytestmark = pytest.mark.usefixtures("single_torch_thread")

IN_DIM = 32
N_CLASSES = 3
SMALL = {"hidden_dim": 64}
MODELS = ["abmil", "meanpool", "transmil"]




def _small_model(name: str, seed: int = 0, **options: object) -> MILModel:
    torch.manual_seed(seed)
    return create_mil_model(name, IN_DIM, N_CLASSES, **{**SMALL, **options})


def _first_linear(model: MILModel) -> nn.Linear:
    layer = model.instance_encoder[0]
    assert isinstance(layer, nn.Linear) and layer.in_features == model.in_dim
    return layer


def test_registry_lists_models() -> None:
    assert available_models() == ["abmil", "chowder", "dsmil", "meanpool", "transmil"]  # dsmil/chowder: own file


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("batched", [False, True])
def test_forward_backward_shapes(name: str, n: int, batched: bool) -> None:
    model = _small_model(name)
    model.train()
    bag = torch.randn(n, IN_DIM)
    out = model(bag.unsqueeze(0) if batched else bag)
    assert out["logits"].shape == (1, N_CLASSES)
    assert out["embedding"].shape == (1, model.embedding_dim) == (1, SMALL["hidden_dim"])
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["embedding"]).all()
    if model.provides_attention:
        attention = out["attention"]
        assert attention.shape == (1, n)
        assert (attention >= 0).all()
        assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    else:
        assert "attention" not in out
    loss = nn.functional.cross_entropy(out["logits"], torch.tensor([1]))
    loss.backward()
    grad = _first_linear(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_abmil_is_the_only_model_with_attention() -> None:
    assert [name for name in MODELS if _small_model(name).provides_attention] == ["abmil"]


def test_flat_and_batched_inputs_agree() -> None:
    for name in MODELS:
        model = _small_model(name).eval()
        bag = torch.randn(13, IN_DIM)
        with torch.no_grad():
            torch.testing.assert_close(model(bag)["logits"], model(bag[None])["logits"])


@pytest.mark.parametrize("name", MODELS)
def test_default_dims_on_1000_instances(name: str) -> None:
    torch.manual_seed(0)
    model = create_mil_model(name, 1024, 5)
    assert model.config["options"]["hidden_dim"] == 512
    if name == "transmil":
        attn = model.layer1.attention
        assert (attn.heads, attn.num_landmarks, attn.to_qkv.out_features) == (8, 256, 3 * 512)
    out = model(torch.randn(1000, 1024))
    assert out["logits"].shape == (1, 5)
    assert out["embedding"].shape == (1, 512)
    out["logits"].logsumexp(-1).sum().backward()
    assert _first_linear(model).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_cpu_determinism(name: str) -> None:
    bag = torch.randn(50, IN_DIM, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([2])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model = _small_model(name, seed=123).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            torch.manual_seed(7)  # dropout masks
            loss = nn.functional.cross_entropy(model(bag)["logits"], target)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            model.eval()
            with torch.no_grad():
                logits = model(bag)["logits"]
            runs.append((loss.detach(), grads, logits))
    finally:
        torch.use_deterministic_algorithms(previous)
    (loss_a, grads_a, logits_a), (loss_b, grads_b, logits_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert torch.equal(logits_a, logits_b)


def _separable_bags(n_bags: int = 20, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each bag: 10-29 standard-normal noise instances plus 2-4 instances near its class's mean."""
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.eye(N_CLASSES, IN_DIM)
    bags, labels = [], []
    for i in range(n_bags):
        label = i % N_CLASSES
        n_noise = int(torch.randint(10, 30, (1,), generator=g))
        n_signal = int(torch.randint(2, 5, (1,), generator=g))
        signal = means[label] + 0.3 * torch.randn(n_signal, IN_DIM, generator=g)
        bag = torch.cat([torch.randn(n_noise, IN_DIM, generator=g), signal])
        bags.append(bag[torch.randperm(len(bag), generator=g)])
        labels.append(label)
    return bags, torch.tensor(labels)


@pytest.mark.parametrize("name", MODELS)
def test_learns_separable_bags(name: str) -> None:
    bags, labels = _separable_bags()
    model = _small_model(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    accuracy = 0.0
    for _epoch in range(30):
        model.train()
        for bag, label in zip(bags, labels, strict=True):
            loss = nn.functional.cross_entropy(model(bag)["logits"], label.view(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predictions = torch.stack([model(bag)["logits"].argmax(-1)[0] for bag in bags])
        accuracy = (predictions == labels).float().mean().item()
        if accuracy == 1.0:
            break
    assert accuracy == 1.0


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"unknown MIL model 'nope'.*abmil.*meanpool.*transmil"):
        create_mil_model("nope", IN_DIM, N_CLASSES)


def test_unknown_option() -> None:
    with pytest.raises(TypeError, match=r"'hiden_dim'.*accepted options: attention_dim, dropout, hidden_dim"):
        create_mil_model("abmil", IN_DIM, N_CLASSES, hiden_dim=64)
    with pytest.raises(TypeError, match="'attention_dim'"):
        create_mil_model("transmil", IN_DIM, N_CLASSES, attention_dim=64)


def test_bad_constructor_values() -> None:
    with pytest.raises(ValueError, match="in_dim"):
        create_mil_model("abmil", 0, N_CLASSES)
    with pytest.raises(ValueError, match="multiple of heads"):
        create_mil_model("transmil", IN_DIM, N_CLASSES, hidden_dim=60, heads=8)


@pytest.mark.parametrize("name", MODELS)
def test_bad_bag_shapes(name: str) -> None:
    model = _small_model(name)
    with pytest.raises(ValueError, match=r"expects in_dim=32"):
        model(torch.randn(5, IN_DIM + 1))
    with pytest.raises(ValueError, match="one bag at a time"):
        model(torch.randn(2, 5, IN_DIM))
    with pytest.raises(ValueError, match="empty"):
        model(torch.randn(0, IN_DIM))
    with pytest.raises(ValueError, match=r"\[N, D\] or \[1, N, D\]"):
        model(torch.randn(IN_DIM))
    with pytest.raises(ValueError, match=r"\[N, D\] or \[1, N, D\]"):
        model(torch.randn(1, 1, 5, IN_DIM))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.ones(5, IN_DIM, dtype=torch.long))


@pytest.mark.parametrize("name", MODELS)
def test_config_rebuilds_same_model(name: str) -> None:
    model = _small_model(name, dropout=0.0)
    config = model.config
    assert config["name"] == name
    assert (config["in_dim"], config["n_classes"]) == (IN_DIM, N_CLASSES)
    assert config["options"]["hidden_dim"] == 64
    assert set(config["options"]) == set(model_options(name))
    rebuilt = mil_model_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == config
    bag = torch.randn(9, IN_DIM)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(bag)["logits"], model.eval()(bag)["logits"])


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
    model = _small_model("transmil").eval()
    seen: list[tuple[int, ...]] = []
    handle = model.ppeg.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            model(torch.randn(7, IN_DIM))
    finally:
        handle.remove()
    assert seen == [(1, 10, SMALL["hidden_dim"])]


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
    assert create_mil_model("transmil", IN_DIM, N_CLASSES).config["options"]["mask_padding"] is True


def test_transmil_large_bag_no_grad() -> None:
    """A bag far bigger than the landmark count runs (Nystrom attention is linear in N)."""
    model = _small_model("transmil").eval()
    with torch.no_grad():
        out = model(torch.randn(20_000, IN_DIM))
    assert out["logits"].shape == (1, N_CLASSES)
    assert torch.isfinite(out["logits"]).all()
