"""What identifies the features a config computes (:func:`feature_identity`, :func:`feature_width`), and are
two sets of them comparable (:func:`check_identity`, between training and inference)."""

from __future__ import annotations

from collections.abc import Mapping

from ubc_ocean.config import ConfigError
from ubc_ocean.encoders.weights import resolve_weights


def feature_width(cfg: Mapping) -> int:
    """The width D of the features the configured encoder makes (every bag's, every MIL model's
    ``in_dim``): from the encoder's architecture, without loading its weights; never from the data."""
    from ubc_ocean.encoders.registry import encoder_out_dim  # torch and timm: asked only where models are built

    features = cfg["features"]
    return encoder_out_dim(features["encoder"], features["weights"], features["input_size"])


def feature_identity(cfg: Mapping) -> dict:
    """What makes the features the config computes comparable with others: the encoder and its weights
    (sha256 of the file, or of the hub name), input size, tile size and magnification, how the tiles are
    stored (stage 03 embeds them after this encoding; fused inference applies the same round trip), the
    stain normalisation method, the feature width and whether batch-norm statistics are adapted to each
    side's tiles. Stage 04 records it with each model; stage 05 refuses to predict with a model trained on
    features of another identity."""
    features, tiling = cfg["features"], cfg["tiling"]
    resolved = resolve_weights(features["encoder"], features["weights"], features["input_size"])
    fmt = "jpg" if tiling["format"] in ("jpg", "jpeg") else str(tiling["format"])
    return {
        "encoder": str(features["encoder"]), "weights_sha256": resolved.identity,
        "input_size": int(resolved.input_size), "tile_size": int(tiling["tile_size"]),
        "magnification": float(tiling["target_magnification"]),
        "tile_encoding": f"jpg q{int(tiling['jpeg_quality'])}" if fmt == "jpg" else fmt,
        "stain_normalisation": str(features["stain_normalisation"]), "feature_dim": feature_width(cfg),
        "bn_adaptation": bool(features["bn_adaptation"]),
    }


# What identifies features, in the order a difference is reported, with the words for each.
IDENTITY_KEYS = {
    "encoder": "encoder", "weights_sha256": "weights (sha256)", "input_size": "input size",
    "tile_size": "tile size", "magnification": "magnification", "tile_encoding": "tile encoding",
    "stain_normalisation": "stain normalisation", "feature_dim": "feature dimension",
    "bn_adaptation": "batch-norm adaptation",
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
