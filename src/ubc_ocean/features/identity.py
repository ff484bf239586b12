"""Are two sets of features comparable? The identity check between training and inference features."""

from __future__ import annotations

from collections.abc import Mapping

from ubc_ocean.config import ConfigError

# What identifies features, in the order a difference is reported, with the words for each.
IDENTITY_KEYS = {
    "encoder": "encoder", "weights_sha256": "weights (sha256)", "input_size": "input size",
    "tile_size": "tile size", "magnification": "magnification", "tile_encoding": "tile encoding",
    "feature_dim": "feature dimension",
}


def describe_identity(identity: Mapping) -> str:
    """One line naming every part of a feature identity (weights by the first 12 hex digits)."""
    parts = []
    for key, words in IDENTITY_KEYS.items():
        value = identity.get(key, "?")
        parts.append(f"{words} {str(value)[:12] if key == 'weights_sha256' else value}")
    return ", ".join(parts)


def identity_differences(trained: Mapping, computed: Mapping) -> list[str]:
    """The identity keys whose values differ (a key the training record lacks is not compared: models
    trained before it was recorded are checked on what they have)."""
    return [key for key in IDENTITY_KEYS if key in trained and key in computed and trained[key] != computed[key]]


def check_identity(model: str, trained: Mapping, computed: Mapping) -> None:
    """A ``ConfigError`` naming both sides when ``model`` was trained on features of another identity than
    the ones the config computes."""
    differ = identity_differences(trained, computed)
    if not differ:
        return
    first = differ[0]
    raise ConfigError(
        f"model {model!r} was trained on other features than this config computes ({', '.join(differ)} differ: "
        f"{IDENTITY_KEYS[first]} {trained[first]!r} at training, {computed[first]!r} now).\n"
        f"  trained on: {describe_identity(trained)}\n  this config: {describe_identity(computed)}\n"
        "Set features.* and tiling.* as they were for training (its config.yaml beside the model), or retrain "
        "(stages 03-04)")
