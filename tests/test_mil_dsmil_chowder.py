"""DSMIL and Chowder: shapes, gradients, stream definitions, determinism, learning, config, huge bags."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ubc_ocean.mil import MILModel, create_mil_model, mil_model_from_config
from ubc_ocean.mil.chowder import Chowder, extreme_scores
from ubc_ocean.mil.dsmil import DSMIL
from ubc_ocean.mil.registry import model_options

pytestmark = pytest.mark.usefixtures("single_torch_thread")

IN_DIM, N_CLASSES = 32, 3
MODELS = ["dsmil", "chowder"]
SMALL: dict[str, dict[str, Any]] = {
    "dsmil": {"hidden_dim": 32, "query_dim": 16},
    "chowder": {"n_top": 3, "n_bottom": 3, "hidden_dims": [16]},
}


def _model(name: str, seed: int = 0, **options: Any) -> MILModel:
    torch.manual_seed(seed)
    return create_mil_model(name, IN_DIM, N_CLASSES, **{**SMALL[name], **options})


def _loss(out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """The training objective: cross-entropy, averaged with the instance stream's when there is one."""
    loss = nn.functional.cross_entropy(out["logits"], target)
    if "aux_logits" in out:
        loss = 0.5 * (loss + nn.functional.cross_entropy(out["aux_logits"], target))
    return loss


def _first_linear(model: MILModel) -> nn.Linear:
    layer = model.instance_encoder[0]
    assert isinstance(layer, nn.Linear) and layer.in_features == IN_DIM
    return layer


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("batched", [False, True])
def test_forward_backward(name: str, n: int, batched: bool) -> None:
    model = _model(name).train()
    bag = torch.randn(n, IN_DIM)
    out = model(bag[None] if batched else bag)
    assert out["logits"].shape == (1, N_CLASSES)
    assert out["embedding"].shape == (1, model.embedding_dim)
    assert out["instance_scores"].shape == (1, n, N_CLASSES)
    assert all(torch.isfinite(value).all() for value in out.values())
    if name == "dsmil":
        assert model.provides_attention
        assert model.embedding_dim == N_CLASSES * SMALL["dsmil"]["hidden_dim"]
        assert out["aux_logits"].shape == (1, N_CLASSES)
        torch.testing.assert_close(out["aux_logits"], out["instance_scores"].amax(dim=1))
        attention = out["attention"]
        assert attention.shape == (1, n)
        assert (attention >= 0).all()
        assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert out["class_attention"].shape == (1, n, N_CLASSES)
        torch.testing.assert_close(out["class_attention"].sum(dim=1), torch.ones(1, N_CLASSES))
    else:
        assert not model.provides_attention
        assert model.embedding_dim == N_CLASSES * (3 + 3)
        assert "attention" not in out and "aux_logits" not in out
    _loss(out, torch.tensor([1])).backward()
    grad = _first_linear(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = _model(name, dropout=0.0).train()
    _loss(model(torch.randn(7, IN_DIM)), torch.tensor([0])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_flat_and_batched_inputs_agree() -> None:
    bag = torch.randn(13, IN_DIM)
    for name in MODELS:
        model = _model(name).eval()
        with torch.no_grad():
            flat, batched = model(bag), model(bag[None])
        assert flat.keys() == batched.keys()
        for key in flat:
            torch.testing.assert_close(flat[key], batched[key])


def test_dsmil_bag_stream_follows_the_paper() -> None:
    """Critical instance per class = argmax of its instance score; attention = softmax over instances of
    q_i . q_crit / sqrt(query_dim); bag embedding = attention-weighted sum of values; logits = Conv1d."""
    model = _model("dsmil").eval()
    assert isinstance(model, DSMIL)
    bag = torch.randn(40, IN_DIM)
    with torch.no_grad():
        out = model(bag)
        h = model.instance_encoder(bag)
        scores = model.instance_classifier(h)
        q, v = model.query(h), model.value(h)
        columns, embeddings = [], []
        for c in range(N_CLASSES):
            critical = int(scores[:, c].argmax())
            a = torch.softmax(q @ q[critical] / math.sqrt(16), dim=0)  # [N]
            columns.append(a)
            embeddings.append(a @ v)
        attention = torch.stack(columns, dim=1)  # [N, C]
        b = torch.stack(embeddings)  # [C, hidden]
        conv = model.bag_classifier
        logits = (conv.weight.reshape(N_CLASSES, -1) @ b.reshape(-1) + conv.bias)[None]
    torch.testing.assert_close(out["instance_scores"][0], scores)
    torch.testing.assert_close(out["class_attention"][0], attention)
    torch.testing.assert_close(out["attention"][0], attention.mean(dim=1))
    torch.testing.assert_close(out["embedding"], b.reshape(1, -1))
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["aux_logits"][0], scores.max(dim=0).values)


def test_chowder_embedding_is_top_and_bottom_scores() -> None:
    model = _model("chowder").eval()
    assert isinstance(model, Chowder)
    with torch.no_grad():
        out = model(torch.randn(25, IN_DIM))
    scores = out["instance_scores"][0]  # [N, C]
    ordered = scores.sort(dim=0, descending=True).values
    expected = torch.cat([ordered[:3], ordered[-3:].flip(0)], dim=0).T.reshape(1, -1)
    torch.testing.assert_close(out["embedding"], expected)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model.mlp(expected))


def test_extreme_scores_pad_small_bags() -> None:
    scores = torch.tensor([[3.0, -1.0], [1.0, 2.0]])
    got = extreme_scores(scores, n_top=3, n_bottom=2)
    assert got.tolist() == [[3.0, 1.0, 1.0, 1.0, 3.0], [2.0, -1.0, -1.0, -1.0, 2.0]]
    one = torch.tensor([[0.5, -2.0]])
    assert extreme_scores(one, n_top=2, n_bottom=3).tolist() == [[0.5] * 5, [-2.0] * 5]
    assert extreme_scores(scores, n_top=1, n_bottom=0).tolist() == [[3.0], [2.0]]


def test_default_options() -> None:
    assert model_options("dsmil") == {"hidden_dim": 256, "query_dim": 128, "dropout": 0.25}
    assert model_options("chowder") == {"n_top": 5, "n_bottom": 5, "hidden_dims": (200, 100), "dropout": 0.5}
    torch.manual_seed(0)
    bag = torch.randn(1000, 1024)
    dsmil = create_mil_model("dsmil", 1024, 5)
    assert dsmil.config["options"] == {"hidden_dim": 256, "query_dim": 128, "dropout": 0.25}
    assert dsmil(bag)["embedding"].shape == (1, 5 * 256)
    chowder = create_mil_model("chowder", 1024, 5)
    assert chowder.config["options"] == {"n_top": 5, "n_bottom": 5, "hidden_dims": [200, 100], "dropout": 0.5}
    widths = [layer.out_features for layer in chowder.mlp if isinstance(layer, nn.Linear)]
    assert widths == [200, 100, 5]
    assert all(layer.p == 0.5 for layer in chowder.mlp if isinstance(layer, nn.Dropout))
    assert chowder(bag)["embedding"].shape == (1, 5 * 10)


def test_chowder_hidden_dims_tuple_or_list() -> None:
    as_tuple = _model("chowder", hidden_dims=(16, 8))
    as_list = _model("chowder", hidden_dims=[16, 8])
    assert as_tuple.config == as_list.config
    assert as_tuple.config["options"]["hidden_dims"] == [16, 8]
    assert _model("chowder", hidden_dims=[]).config["options"]["hidden_dims"] == []


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("dsmil", {"query_dim": 0}, "query_dim"),
        ("dsmil", {"hidden_dim": 0}, "embedding_dim"),
        ("chowder", {"n_top": 0}, "n_top"),
        ("chowder", {"n_bottom": -1}, "n_bottom"),
        ("chowder", {"hidden_dims": [16, 0]}, "hidden_dims"),
        ("chowder", {"hidden_dims": 16}, "hidden_dims"),
        ("chowder", {"hidden_dims": "16"}, "hidden_dims"),
    ],
)
def test_bad_options(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model(name, **options)


def test_unknown_option_names_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"'hidden_dim'.*accepted options: dropout, hidden_dims, n_bottom, n_top"):
        _model("chowder", hidden_dim=64)
    with pytest.raises(TypeError, match=r"'n_top'.*accepted options: dropout, hidden_dim, query_dim"):
        _model("dsmil", n_top=2)


@pytest.mark.parametrize("name", MODELS)
def test_bad_bag_shapes(name: str) -> None:
    model = _model(name)
    with pytest.raises(ValueError, match=r"expects in_dim=32"):
        model(torch.randn(5, IN_DIM + 1))
    with pytest.raises(ValueError, match="one bag at a time"):
        model(torch.randn(2, 5, IN_DIM))
    with pytest.raises(ValueError, match="empty"):
        model(torch.randn(0, IN_DIM))
    with pytest.raises(ValueError, match=r"\[N, D\] or \[1, N, D\]"):
        model(torch.randn(IN_DIM))


@pytest.mark.parametrize("name", MODELS)
def test_cpu_determinism(name: str) -> None:
    bag = torch.randn(50, IN_DIM, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([2])
    previous, previous_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model = _model(name, seed=123).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            torch.manual_seed(7)  # dropout masks
            out = model(bag)
            loss = _loss(out, target)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            model.eval()
            with torch.no_grad():
                logits = model(bag)["logits"]
            runs.append((out["logits"].detach(), loss.detach(), grads, logits))
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
    (train_a, loss_a, grads_a, logits_a), (train_b, loss_b, grads_b, logits_b) = runs
    assert torch.equal(train_a, train_b) and torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) == len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert torch.equal(logits_a, logits_b)


def _separable_bags(n_bags: int = 21, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
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
    """Trained with the combined loss for DSMIL (both streams), plain cross-entropy for Chowder."""
    bags, labels = _separable_bags()
    model = _model(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracy = 0.0
    for _epoch in range(60):
        model.train()
        for bag, label in zip(bags, labels, strict=True):
            loss = _loss(model(bag), label.view(1))
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


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trip(name: str) -> None:
    """Through YAML (tuples become lists) and ``mil_model_from_config``: same config, identical outputs."""
    model = _model(name).eval()
    config = yaml.safe_load(yaml.safe_dump(model.config))
    assert config == model.config
    rebuilt = mil_model_from_config(config)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    bag = torch.randn(9, IN_DIM)
    with torch.no_grad():
        expected, got = model(bag), rebuilt.eval()(bag)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, tuple | list) else (result,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


@pytest.mark.parametrize("name", MODELS)
def test_twenty_thousand_instances_stay_linear(name: str) -> None:
    n = 20_000
    model = _model(name).eval()
    bag = torch.randn(n, IN_DIM)
    with torch.no_grad(), _LargestTensor() as tracker:
        out = model(bag)
    assert out["logits"].shape == (1, N_CLASSES)
    assert out["instance_scores"].shape == (1, n, N_CLASSES)
    assert torch.isfinite(out["logits"]).all()
    assert 0 < tracker.largest <= n * max(IN_DIM, SMALL["dsmil"]["hidden_dim"])  # nothing N x N (4e8)
    if name == "dsmil":
        assert out["attention"].sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_autocast(name: str) -> None:
    model = _model(name).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(300, IN_DIM))
    assert out["logits"].shape == (1, N_CLASSES)
    assert all(torch.isfinite(value.float()).all() for value in out.values())
    if name == "dsmil":
        assert out["attention"].dtype == torch.float32
        assert out["attention"].sum().item() == pytest.approx(1.0, abs=1e-5)
