"""PANTHER's known answers: its EM recovers a Gaussian mixture that the instances were drawn from, the slide
vector is laid out ``[weights, means, variances]``, its prototypes come from the training bags only, and
they travel with the checkpoint."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ubc_ocean.config import load_config
from ubc_ocean.mil import create_mil_model
from ubc_ocean.mil.checkpoint import load_checkpoint, save_checkpoint
from ubc_ocean.mil.panther import Mixture, Panther, mixture_em
from ubc_ocean.mil.train import fit, model_training_config

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The known mixture: 3 components in 4 dimensions, diagonal covariances.
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MEANS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, -3.0, 1.0, 2.0], [-3.0, 3.0, -4.0, 1.0]])
VARIANCES = torch.tensor([[1.0, 0.5, 2.0, 1.0], [0.3, 1.0, 0.6, 1.5], [1.2, 0.4, 0.8, 0.5]])


def draw(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """``n`` instances of the known mixture (its means moved by ``shift``)."""
    generator = torch.Generator().manual_seed(seed)
    component = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    noise = torch.randn(n, MEANS.shape[1], generator=generator)
    return MEANS[component] + shift + noise * VARIANCES[component].sqrt()


def near_start(seed: int = 1) -> Mixture:
    """The true means moved by about half a unit, unit variances, equal weights."""
    generator = torch.Generator().manual_seed(seed)
    means = MEANS + 0.5 * torch.randn(MEANS.shape, generator=generator)
    return Mixture(torch.full((3,), 1 / 3), means, torch.ones_like(VARIANCES))


def test_em_recovers_the_mixture_it_was_drawn_from() -> None:
    x = draw(4000, seed=0)
    fitted, responsibilities = mixture_em(x, near_start(), steps=10, prior_strength=0.1, variance_floor=1e-3)
    assert (fitted.weights - WEIGHTS).abs().max() < 0.03
    assert (fitted.means - MEANS).abs().max() < 0.1
    assert ((fitted.variances - VARIANCES).abs() / VARIANCES).max() < 0.15
    assert responsibilities.shape == (4000, 3)
    torch.testing.assert_close(responsibilities.sum(1), torch.ones(4000))


def test_em_is_differentiable_and_a_lonely_component_stays_at_its_prototype() -> None:
    """Gradients reach the instances; a component no instance belongs to keeps its prototype (no 0 / 0)."""
    start = near_start()
    far = Mixture(torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.cat([start.means, torch.full((1, 4), 100.0)]),
                  torch.ones(4, 4))
    x = draw(500, seed=2).requires_grad_(True)
    fitted, _ = mixture_em(x, far, steps=3, prior_strength=0.1, variance_floor=1e-3)
    assert torch.isfinite(fitted.means).all() and torch.isfinite(fitted.variances).all()
    torch.testing.assert_close(fitted.means[3], torch.full((4,), 100.0))
    assert fitted.weights[3] < 1e-3
    fitted.means.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def known_model(em_steps: int = 10) -> Panther:
    """A PANTHER whose prototypes are set by hand near the true mixture (no standardisation)."""
    model = create_mil_model("panther", 4, 2, n_prototypes=3, em_steps=em_steps, hidden_dim=8)
    start = near_start()
    model.prototypes.copy_(start.means)
    model.prototype_variances.copy_(start.variances)
    model.prototype_weights.copy_(start.weights)
    return model.eval()


def test_slide_vector_is_weights_then_means_then_variances() -> None:
    model = known_model()
    bag = draw(4000, seed=3)
    with torch.no_grad():
        out = model(bag)
        mixture, responsibilities = model.slide_mixture(bag)
    c, d = 3, 4
    vector = out["slide_vector"][0]
    assert vector.shape == (c * (1 + 2 * d),)
    weights, means, variances = vector[:c], vector[c:c + c * d].view(c, d), vector[c + c * d:].view(c, d)
    torch.testing.assert_close(weights, mixture.weights)
    torch.testing.assert_close(means, mixture.means)
    torch.testing.assert_close(variances, mixture.variances)
    assert (weights - WEIGHTS).abs().max() < 0.03 and (means - MEANS).abs().max() < 0.1
    torch.testing.assert_close(out["responsibilities"][0], responsibilities)


def matched(prototypes: torch.Tensor) -> torch.Tensor:
    """The prototypes reordered to the true components (the permutation nearest the true means)."""
    best = min(itertools.permutations(range(3)), key=lambda p: float((prototypes[list(p)] - MEANS).abs().sum()))
    return torch.tensor(best)


def test_prototypes_come_from_k_means_of_the_training_tiles() -> None:
    bags = [draw(200, seed=10 + i).half() for i in range(15)]
    model = create_mil_model("panther", 4, 2, n_prototypes=3, hidden_dim=8)
    state = torch.get_rng_state()
    model.init_from_training_bags(bags, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global random state is left alone
    assert bool(model.fitted)
    prototypes = model.prototypes * model.scale + model.center  # back to the tiles' units
    order = matched(prototypes)
    assert (prototypes[order] - MEANS).abs().max() < 0.15
    assert (model.prototype_weights[order] - WEIGHTS).abs().max() < 0.03
    # k-means assigns each tile to one cluster, so an overlapping neighbour's tail widens a cluster's
    # spread: its variances are the truth's order only; the slide's EM refines them.
    variances = model.prototype_variances[order] * model.scale**2
    assert ((variances - VARIANCES).abs() / VARIANCES).max() < 0.6


def test_fit_takes_prototypes_from_the_training_bags_only(tmp_path) -> None:
    """Validation bags drawn 50 units away never move a prototype; the checkpoint keeps the prototypes and
    the rebuilt model predicts the same."""
    train = [draw(60, seed=20 + i) for i in range(8)]
    valid = [draw(60, seed=40 + i, shift=50.0) for i in range(4)]
    mil = {**model_training_config(load_config(None)["mil"], "panther"), "epochs": 1}
    result = fit("panther", {"n_prototypes": 3, "hidden_dim": 8}, train, [0, 1] * 4, valid, [0, 1] * 2, 2, mil,
                 seed=0, device=torch.device("cpu"))
    model = result.model
    prototypes = model.prototypes * model.scale + model.center
    assert (prototypes[matched(prototypes)] - MEANS).abs().max() < 0.5
    path = tmp_path / "panther.pt"
    save_checkpoint(path, model, ["a", "b"], {})
    loaded, _ = load_checkpoint(path)
    for name in ("center", "scale", "prototypes", "prototype_variances", "prototype_weights", "fitted"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    bag = draw(30, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(loaded(bag)["logits"], model.eval()(bag)["logits"])


def test_too_few_training_tiles_is_a_clear_error() -> None:
    model = create_mil_model("panther", 4, 2, n_prototypes=16, hidden_dim=8)
    with pytest.raises(ValueError, match=r"n_prototypes=16 training tiles.*got 10"):
        model.init_from_training_bags([draw(10, seed=0)], seed=0)
    assert not bool(model.fitted)
    assert np.isfinite(model(draw(5, seed=1))["logits"].detach().numpy()).all()  # unfitted still runs
