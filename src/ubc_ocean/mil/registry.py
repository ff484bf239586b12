"""Name -> MIL model class registry, with strict checking of names and options."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ubc_ocean.mil.base import MILModel

_REGISTRY: dict[str, type[MILModel]] = {}
# Options every model takes, with their defaults (MILModel's docstring); the config's mil.bag_standardise sets one.
COMMON_OPTIONS: dict[str, Any] = {"bag_standardise": False}

M = TypeVar("M", bound=type[MILModel])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: register a ``MILModel`` subclass under ``name`` (names are unique)."""

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, MILModel)):
            raise TypeError(f"@register({name!r}) expects a MILModel subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"MIL model name {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.model_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_models() -> list[str]:
    """Sorted names of all registered MIL models."""
    return sorted(_REGISTRY)


def model_options(name: str) -> dict[str, Any]:
    """The options model ``name`` accepts, with their default values."""
    cls = _lookup(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    return {
        p.name: p.default
        for p in params
        if p.name not in ("in_dim", "n_classes") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    } | COMMON_OPTIONS


def default_training(name: str) -> dict[str, Any]:
    """The ``mil`` training keys model ``name`` sets for itself (its class's ``default_training``)."""
    return dict(_lookup(name).default_training)


def create_mil_model(name: str, in_dim: int, n_classes: int, **options: Any) -> MILModel:
    """Build the registered model ``name``.

    Raises ``ValueError`` for an unknown name (listing the known ones) and ``TypeError`` for an option
    the model does not accept (naming it and listing the accepted ones).
    """
    cls = _lookup(name)
    known = model_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(repr(u) for u in unknown)} for MIL model {name!r}; "
            f"accepted options: {', '.join(sorted(known)) or '(none)'}"
        )
    common = {key: options.pop(key) for key in list(options) if key in COMMON_OPTIONS}
    model = cls(in_dim, n_classes, **options)
    model.standardise_bags(bool(common.get("bag_standardise", False)))
    return model


def mil_model_from_config(config: Mapping[str, Any]) -> MILModel:
    """Rebuild a model from its ``config`` dict (as stored in a checkpoint); weights are not loaded."""
    missing = [k for k in ("name", "in_dim", "n_classes") if k not in config]
    if missing:
        raise ValueError(f"MIL model config lacks {missing}; got keys {sorted(config)}")
    return create_mil_model(
        config["name"], int(config["in_dim"]), int(config["n_classes"]), **dict(config.get("options", {}))
    )


def _lookup(name: str) -> type[MILModel]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown MIL model {name!r}; known models: {', '.join(available_models())}") from None
