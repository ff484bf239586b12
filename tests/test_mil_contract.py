"""The MIL model contract, checked for every model in the registry (``available_models()``).

Each test is parametrized over the registry, so a model registered later is tested with no edit here. What is
known about one model (its outputs, widths, default options, learning recipe) and every contract that does not
hold for it as stated, with the reason and what is checked instead, is written once, in ``EXPECTED``.
Model-specific known-answer tests live in ``test_mil_<model>.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.builders import MIL_IN_DIM, MIL_N_CLASSES, SMALL_MIL_OPTIONS, separable_bags, small_mil_model
from ubc_ocean.mil import MILModel, available_models, create_mil_model, mil_model_from_config
from ubc_ocean.mil.registry import COMMON_OPTIONS, model_options
from ubc_ocean.mil.transmil import TransMIL

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MODELS = available_models()


def widest_layer(model: MILModel) -> int:
    """The widest per-instance feature a model can hold: its input or any Linear / convolution output."""
    widths = [model.in_dim]
    for module in model.modules():
        if isinstance(module, nn.Linear):
            widths.append(module.out_features)
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            widths.append(module.out_channels)
    return max(widths)


def layer_bound(model: MILModel, n: int) -> int:
    """The contract: no tensor larger than ``N x`` the widest layer (linear memory; nothing ``N x N``)."""
    return n * widest_layer(model)


def nystrom_bound(model: MILModel, n: int) -> int:
    """TransMIL: ``N`` padded to a square, plus cls, then up to a multiple of the landmark count, times the
    wider of its widest layer and the ``heads x num_landmarks`` Nystrom similarity block per token."""
    assert isinstance(model, TransMIL)
    attention = model.layer1.attention
    tokens = math.ceil(math.sqrt(n)) ** 2 + 1
    tokens = math.ceil(tokens / attention.num_landmarks) * attention.num_landmarks
    return tokens * max(widest_layer(model), attention.heads * attention.num_landmarks)


def first_linear(model: MILModel) -> nn.Linear:
    """A model projects instances with ``instance_encoder``, whose first layer is ``Linear(in_dim, .)``:
    the first learned layer, which every gradient must reach."""
    layer = model.instance_encoder[0]
    assert isinstance(layer, nn.Linear) and layer.in_features == model.in_dim
    return layer


def panther_head(model: MILModel) -> nn.Linear:
    """PANTHER's first learned layer: the head's ``Linear`` on the slide vector (its EM has no parameters)."""
    layer = next(module for module in model.head if isinstance(module, nn.Linear))
    assert isinstance(layer, nn.Linear) and layer.in_features == model.slide_dim
    return layer


@dataclass(frozen=True)
class Expected:
    """What the contract tests know about one registered model. ``None``: not known, that check is left out.

    ``exceptions`` names each contract that does not hold for the model as stated, with the reason; the
    contract's test then checks the replacement given in the fields below instead of leaving the model out.
    """

    outputs: frozenset[str] | None = None  # the keys forward returns
    embedding_dim: int | None = None  # with SMALL_MIL_OPTIONS, MIL_IN_DIM in, MIL_N_CLASSES out
    default_options: Mapping[str, Any] | None = None  # config["options"] of create_mil_model(name, 1024, 5)
    default_embedding_dim: int | None = None  # the same model's embedding width
    lr: float = 1e-3  # the known-answer learning test's Adam learning rate ...
    max_epochs: int = 30  # ... and its epoch budget
    exceptions: Mapping[str, str] = field(default_factory=dict)
    largest_tensor: Callable[[MILModel, int], int] = layer_bound  # replacement under "largest_tensor"
    bf16_attention_tolerance: float = 1e-5  # replacement under "bf16_attention_fp32"
    first_layer: Callable[[MILModel], nn.Linear] = first_linear  # replacement under "first_layer"


EXPECTED: dict[str, Expected] = {
    "abmil": Expected(
        outputs=frozenset({"logits", "embedding", "attention", "attention_scores"}),
        embedding_dim=64,
        default_options={"hidden_dim": 512, "attention_dim": 256, "dropout": 0.25},
        default_embedding_dim=512,
    ),
    "chowder": Expected(
        outputs=frozenset({"logits", "embedding", "instance_scores", "channel_scores"}),
        embedding_dim=MIL_N_CLASSES * 3 * (3 + 3),
        default_options={"n_top": 5, "n_bottom": 5, "hidden_dims": [200, 100], "dropout": 0.5,
                         "channels_per_class": 3},
        default_embedding_dim=5 * 3 * (5 + 5),
        lr=3e-3,
        max_epochs=60,
    ),
    "dsmil": Expected(
        outputs=frozenset({"logits", "aux_logits", "embedding", "attention", "class_attention", "instance_scores"}),
        embedding_dim=MIL_N_CLASSES * 32,
        default_options={"hidden_dim": 256, "query_dim": 128, "dropout": 0.25},
        default_embedding_dim=5 * 256,
        lr=3e-3,
        max_epochs=60,
    ),
    "meanpool": Expected(
        outputs=frozenset({"logits", "embedding"}),
        embedding_dim=64,
        default_options={"hidden_dim": 512, "dropout": 0.25},
        default_embedding_dim=512,
    ),
    "panther": Expected(
        outputs=frozenset({"logits", "embedding", "slide_vector", "responsibilities"}),
        embedding_dim=32,
        default_options={"n_prototypes": 16, "em_steps": 1, "prior_strength": 0.1, "variance_floor": 0.001,
                         "hidden_dim": 256, "dropout": 0.25, "kmeans_instances": 20000},
        default_embedding_dim=256,
        exceptions={
            "first_layer": "PANTHER has no per-instance layer: tiles enter a parameter-free EM of a Gaussian "
            "mixture, so the first learned layer, which the gradient must reach, is the head's Linear",
        },
        first_layer=panther_head,
    ),
    "transmil": Expected(
        outputs=frozenset({"logits", "embedding"}),
        embedding_dim=64,
        default_options={"hidden_dim": 512, "heads": 8, "num_landmarks": 256, "dropout": 0.1, "mask_padding": True,
                         "exact_attention_up_to": 256},
        default_embedding_dim=512,
        exceptions={
            "largest_tensor": "Nystrom attention holds a [heads, tokens, num_landmarks] similarity block, and its "
            "tokens are the bag padded to a square plus cls, rounded up to a multiple of num_landmarks: linear in "
            "N, but wider per instance than any layer",
        },
        largest_tensor=nystrom_bound,
    ),
}


def expected(name: str) -> Expected:
    return EXPECTED.get(name, Expected())


def training_loss(out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """The training objective: cross-entropy, averaged with the instance stream's when there is one."""
    loss = nn.functional.cross_entropy(out["logits"], target)
    if "aux_logits" in out:
        loss = 0.5 * (loss + nn.functional.cross_entropy(out["aux_logits"], target))
    return loss


def check_outputs(model: MILModel, out: dict[str, torch.Tensor], n: int) -> None:
    """Output shapes and values every model promises for one bag of ``n`` instances."""
    c = model.n_classes
    assert out["logits"].shape == (1, c)
    assert out["embedding"].shape == (1, model.embedding_dim)
    assert all(torch.isfinite(value).all() for value in out.values())
    assert model.provides_attention == ("attention" in out)
    if model.provides_attention:
        attention = out["attention"]
        assert attention.shape == (1, n)
        assert (attention >= 0).all()
        assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    for key, shape in (("aux_logits", (1, c)), ("instance_scores", (1, n, c)), ("class_attention", (1, n, c))):
        if key in out:
            assert out[key].shape == shape, key
    exp = expected(model.config["name"])
    if exp.outputs is not None:
        assert set(out) == exp.outputs


def test_registry_lists_models() -> None:
    assert available_models() == ["abmil", "chowder", "dsmil", "meanpool", "panther", "transmil"]


def test_models_with_attention() -> None:
    assert [name for name in MODELS if small_mil_model(name).provides_attention] == ["abmil", "dsmil"]


def test_expectations_match_the_registry_and_every_exception_has_a_reason() -> None:
    assert set(EXPECTED) <= set(MODELS)
    assert set(SMALL_MIL_OPTIONS) <= set(MODELS)
    contract = Expected()
    for name, exp in EXPECTED.items():
        replaced = {"largest_tensor": exp.largest_tensor is not contract.largest_tensor,
                    "bf16_attention_fp32": exp.bf16_attention_tolerance != contract.bf16_attention_tolerance,
                    "first_layer": exp.first_layer is not contract.first_layer}
        for exception, differs in replaced.items():
            assert differs == (exception in exp.exceptions), (name, exception)
        assert set(exp.exceptions) <= set(replaced), name
        assert all(len(reason) > 20 for reason in exp.exceptions.values()), name


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 7, 1000, 3000])
@pytest.mark.parametrize("batched", [False, True])
def test_forward_backward(name: str, n: int, batched: bool) -> None:
    model = small_mil_model(name).train()
    bag = torch.randn(n, MIL_IN_DIM)
    out = model(bag[None] if batched else bag)
    check_outputs(model, out, n)
    if expected(name).embedding_dim is not None:
        assert model.embedding_dim == expected(name).embedding_dim
    training_loss(out, torch.tensor([1])).backward()
    grad = expected(name).first_layer(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    no_dropout = {"dropout": 0.0} if "dropout" in model_options(name) else {}
    model = small_mil_model(name, **no_dropout).train()
    training_loss(model(torch.randn(7, MIL_IN_DIM)), torch.tensor([0])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", MODELS)
def test_flat_and_batched_inputs_agree(name: str) -> None:
    model = small_mil_model(name).eval()
    bag = torch.randn(13, MIL_IN_DIM)
    with torch.no_grad():
        flat, batched = model(bag), model(bag[None])
    assert flat.keys() == batched.keys()
    for key in flat:
        torch.testing.assert_close(flat[key], batched[key])


@pytest.mark.parametrize("name", MODELS)
def test_defaults_on_a_realistic_bag(name: str) -> None:
    """Default options at UBC-OCEAN's sizes (1024-wide embeddings, 5 classes) on 1000 instances."""
    torch.manual_seed(0)
    model = create_mil_model(name, 1024, 5)
    exp = expected(name)
    assert set(model.config["options"]) == set(model_options(name))
    if exp.default_options is not None:  # the model's own, and the options every model takes
        assert model.config["options"] == {**exp.default_options, **COMMON_OPTIONS}
    out = model(torch.randn(1000, 1024))
    assert out["logits"].shape == (1, 5)
    assert out["embedding"].shape == (1, model.embedding_dim)
    if exp.default_embedding_dim is not None:
        assert model.embedding_dim == exp.default_embedding_dim
    out["logits"].logsumexp(-1).sum().backward()
    assert exp.first_layer(model).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_cpu_determinism(name: str) -> None:
    bag = torch.randn(50, MIL_IN_DIM, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([2])
    previous, previous_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model = small_mil_model(name, seed=123).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            torch.manual_seed(7)  # dropout masks
            out = model(bag)
            loss = training_loss(out, target)
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


def accuracy(model: MILModel, bags: list[torch.Tensor], labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.stack([model(bag)["logits"].argmax(-1)[0] for bag in bags])
    return (predictions == labels).float().mean().item()


@pytest.mark.parametrize("name", MODELS)
def test_learns_separable_bags(name: str) -> None:
    """Known answer: bags whose label is planted in a few instances. Trained with the training objective
    (both streams for DSMIL), the model fits all 60 training bags and labels >= 90% of 30 unseen ones."""
    exp = expected(name)
    bags, labels = separable_bags(60, seed=0)
    valid_bags, valid_labels = separable_bags(30, seed=1)
    model = small_mil_model(name)
    model.init_from_training_bags(bags, seed=0)  # as mil.train.fit prepares it (PANTHER: prototypes)
    optimizer = torch.optim.Adam(model.parameters(), lr=exp.lr)
    train_accuracy = valid_accuracy = 0.0
    for _epoch in range(exp.max_epochs):
        model.train()
        for bag, label in zip(bags, labels, strict=True):
            loss = training_loss(model(bag), label.view(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_accuracy = accuracy(model, bags, labels)
        if train_accuracy == 1.0:
            valid_accuracy = accuracy(model, valid_bags, valid_labels)
            if valid_accuracy >= 0.9:
                break
    assert train_accuracy == 1.0
    assert valid_accuracy >= 0.9


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"unknown MIL model 'nope'.*abmil.*meanpool.*transmil") as err:
        create_mil_model("nope", MIL_IN_DIM, MIL_N_CLASSES)
    assert f"known models: {', '.join(MODELS)}" in str(err.value)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_option_names_the_accepted_ones(name: str) -> None:
    accepted = sorted(model_options(name))
    if expected(name).default_options is not None:
        assert accepted == sorted({**expected(name).default_options, **COMMON_OPTIONS})
    with pytest.raises(TypeError, match=rf"'hiden_dim'.*accepted options: {', '.join(accepted)}$"):
        create_mil_model(name, MIL_IN_DIM, MIL_N_CLASSES, hiden_dim=64)
    others = sorted({option for other in MODELS for option in model_options(other)} - set(accepted))
    for option in others:  # another model's option is refused by name, not silently dropped
        with pytest.raises(TypeError, match=f"'{option}'.*accepted options"):
            create_mil_model(name, MIL_IN_DIM, MIL_N_CLASSES, **{option: 2})


@pytest.mark.parametrize("name", MODELS)
def test_bad_dimensions_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="in_dim"):
        create_mil_model(name, 0, MIL_N_CLASSES)
    with pytest.raises(ValueError, match="n_classes"):
        create_mil_model(name, MIL_IN_DIM, 0)


@pytest.mark.parametrize("name", MODELS)
def test_bad_bag_shapes(name: str) -> None:
    model = small_mil_model(name)
    with pytest.raises(ValueError, match=rf"expects in_dim={MIL_IN_DIM}"):
        model(torch.randn(5, MIL_IN_DIM + 1))
    with pytest.raises(ValueError, match="one bag at a time"):
        model(torch.randn(2, 5, MIL_IN_DIM))
    with pytest.raises(ValueError, match="empty"):
        model(torch.randn(0, MIL_IN_DIM))
    with pytest.raises(ValueError, match=r"\[N, D\] or \[1, N, D\]"):
        model(torch.randn(MIL_IN_DIM))
    with pytest.raises(ValueError, match=r"\[N, D\] or \[1, N, D\]"):
        model(torch.randn(1, 1, 5, MIL_IN_DIM))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.ones(5, MIL_IN_DIM, dtype=torch.long))


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trip(name: str) -> None:
    """Through YAML (tuples become lists) and ``mil_model_from_config``: same config, identical outputs."""
    model = small_mil_model(name).eval()
    config = yaml.safe_load(yaml.safe_dump(model.config))
    assert config == model.config
    assert config["name"] == name
    assert (config["in_dim"], config["n_classes"]) == (MIL_IN_DIM, MIL_N_CLASSES)
    assert set(config["options"]) == set(model_options(name))
    for option, value in SMALL_MIL_OPTIONS.get(name, {}).items():
        assert config["options"][option] == value, option
    rebuilt = mil_model_from_config(config)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    bag = torch.randn(9, MIL_IN_DIM)
    with torch.no_grad():
        got, want = rebuilt.eval()(bag), model(bag)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[key], want[key]) for key in want)


@pytest.mark.parametrize("name", MODELS)
def test_bag_standardise_makes_a_model_blind_to_a_per_feature_shift_and_scale_of_the_slide(name: str) -> None:
    """Known answer: with ``bag_standardise`` a bag and the same bag under x -> a * x + b (a > 0, per feature, as
    a hospital's scanner might move its features) give the same outputs; without it they do not. The option
    survives the config round trip (a checkpoint predicts as it was trained)."""
    generator = torch.Generator().manual_seed(3)
    bag = torch.randn(40, MIL_IN_DIM, generator=generator)
    scale = torch.rand(MIL_IN_DIM, generator=generator) * 2 + 0.5
    shift = torch.randn(MIL_IN_DIM, generator=generator) * 3
    moved = bag * scale + shift
    standardised = small_mil_model(name, seed=5, bag_standardise=True).eval()
    plain = small_mil_model(name, seed=5).eval()
    with torch.no_grad():
        same, other = standardised(bag), standardised(moved)
        assert torch.allclose(same["logits"], other["logits"], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain(bag)["logits"], plain(moved)["logits"], atol=1e-3)
    assert standardised.config["options"]["bag_standardise"] is True
    rebuilt = mil_model_from_config(yaml.safe_load(yaml.safe_dump(standardised.config)))
    assert rebuilt.bag_standardise and not plain.bag_standardise


class LargestTensor(TorchDispatchMode):
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
    model = small_mil_model(name).eval()
    bag = torch.randn(n, MIL_IN_DIM)
    with torch.no_grad(), LargestTensor() as tracker:
        out = model(bag)
    assert out["logits"].shape == (1, MIL_N_CLASSES)
    assert torch.isfinite(out["logits"]).all()
    for key in ("instance_scores", "class_attention"):
        if key in out:
            assert out[key].shape == (1, n, MIL_N_CLASSES), key
    if model.provides_attention:
        assert out["attention"].shape == (1, n)
        assert out["attention"].sum().item() == pytest.approx(1.0, abs=1e-4)
    bound = expected(name).largest_tensor(model, n)
    assert 0 < tracker.largest <= bound < n * n // 10  # linear in N: nothing N x N (4e8)


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_autocast(name: str) -> None:
    model = small_mil_model(name).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(300, MIL_IN_DIM))
    assert out["logits"].shape == (1, MIL_N_CLASSES)
    assert all(torch.isfinite(value.float()).all() for value in out.values())
    if model.provides_attention:
        exp = expected(name)
        if "bf16_attention_fp32" not in exp.exceptions:
            assert out["attention"].dtype == torch.float32
        assert out["attention"].float().sum().item() == pytest.approx(1.0, abs=exp.bf16_attention_tolerance)
