"""DSMIL and Chowder: shapes, gradients, the dual-stream loss, determinism, learning, huge bags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ubc_ocean.mil import create_mil_model, mil_model_from_config
from ubc_ocean.mil.chowder import extreme_scores
from ubc_ocean.mil.train import _loss

pytestmark = pytest.mark.usefixtures("single_torch_thread")

IN_DIM, N_CLASSES = 32, 3
SMALL = {"dsmil": {"hidden_dim": 32, "query_dim": 16}, "chowder": {"n_top": 3, "n_bottom": 3, "hidden_dims": [16]}}




def _model(name: str, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return create_mil_model(name, IN_DIM, N_CLASSES, **SMALL[name])


@pytest.mark.parametrize("name", ["dsmil", "chowder"])
@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("batched", [False, True])
def test_forward_backward(name, n, batched):
    model = _model(name).train()
    bag = torch.randn(n, IN_DIM)
    out = model(bag[None] if batched else bag)
    assert out["logits"].shape == (1, N_CLASSES)
    assert out["embedding"].shape == (1, model.embedding_dim)
    assert out["instance_scores"].shape == (1, n, N_CLASSES)
    if name == "dsmil":
        assert out["aux_logits"].shape == (1, N_CLASSES)
        assert (out["attention"] >= 0).all() and out["attention"].sum().item() == pytest.approx(1.0, abs=1e-5)
        assert out["aux_logits"][0].tolist() == pytest.approx(out["instance_scores"][0].max(0).values.tolist())
    else:
        assert "attention" not in out
    _loss(out, torch.tensor([1]), torch.ones(N_CLASSES)).backward()
    grad = model.instance_encoder[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_extreme_scores_pad_small_bags():
    scores = torch.tensor([[3.0, -1.0], [1.0, 2.0]])
    got = extreme_scores(scores, n_top=3, n_bottom=2)
    assert got.tolist() == [[3.0, 1.0, 1.0, 1.0, 3.0], [2.0, -1.0, -1.0, -1.0, 2.0]]


def test_dual_stream_loss_averages_both_streams():
    out = {"logits": torch.tensor([[2.0, 0.0, 0.0]]), "aux_logits": torch.tensor([[0.0, 2.0, 0.0]])}
    target, weights = torch.tensor([0]), torch.ones(3)
    ce = nn.functional.cross_entropy
    expected = 0.5 * (ce(out["logits"], target) + ce(out["aux_logits"], target))
    assert _loss(out, target, weights).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("name", ["dsmil", "chowder"])
def test_deterministic_and_rebuildable(name):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        bag, grads, logits = torch.randn(50, IN_DIM), [], []
        for _ in range(2):
            model = _model(name, seed=3).train()
            torch.manual_seed(11)  # dropout masks
            out = model(bag)
            _loss(out, torch.tensor([2]), torch.ones(N_CLASSES)).backward()
            grads.append(model.instance_encoder[0].weight.grad.clone())
            logits.append(out["logits"].detach())
        assert torch.equal(grads[0], grads[1]) and torch.equal(logits[0], logits[1])
    finally:
        torch.use_deterministic_algorithms(previous)
    model = _model(name).eval()
    rebuilt = mil_model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(bag)["logits"], model(bag)["logits"])


@pytest.mark.parametrize("name", ["dsmil", "chowder"])
def test_learns_a_separable_toy_set(name):
    torch.manual_seed(0)
    centres = torch.randn(N_CLASSES, IN_DIM) * 3
    bags, labels = [], []
    for label in range(N_CLASSES):
        for _ in range(7):
            bag = torch.randn(int(torch.randint(5, 25, ())), IN_DIM)
            bag[:3] += centres[label]
            bags.append(bag)
            labels.append(label)
    model = _model(name)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(40):
        model.train()
        for bag, label in zip(bags, labels, strict=True):
            optimiser.zero_grad()
            _loss(model(bag), torch.tensor([label]), torch.ones(N_CLASSES)).backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            predicted = [int(model(bag)["logits"].argmax()) for bag in bags]
        if predicted == labels:
            break
    assert predicted == labels


@pytest.mark.parametrize("name", ["dsmil", "chowder"])
def test_twenty_thousand_instances(name):
    model = _model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(20_000, IN_DIM))
    assert torch.isfinite(out["logits"]).all()
