"""Layered YAML configuration: package defaults <- config file(s) <- dotted command-line overrides.

Every key must exist in ``defaults.yaml``; an unknown key is an error that names it. A config file may
name a ``base`` file (relative to itself) that is applied first. The merged config is checked whole
(types, ranges, choices, free-form sections: :mod:`ubc_ocean.config.schema`) before any stage sees it.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ubc_ocean.config.schema import (
    DEFAULTS_FILE,
    RENAMED,
    ConfigError,
    check_config,
    defaults,
    text_rule,
    unknown_key,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULTS_FILE", "REPO_ROOT", "Config", "ConfigError", "as_plain", "free_form_keys", "load_config",
           "parse_override", "save_config", "with_overrides"]

_SOURCE_ROOT = Path(__file__).resolve().parents[3]
# Editable install (the repo): paths are relative to the repo root; an installed wheel: to the working dir.
REPO_ROOT = _SOURCE_ROOT if (_SOURCE_ROOT / "pyproject.toml").is_file() else Path.cwd()


class Config(dict):
    """A nested dict with attribute access (``cfg.tiling.tile_size``) and dotted lookup."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(node: Any) -> Any:
    """Plain dicts and lists all the way down (for YAML, JSON and pickles)."""
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


as_plain = _plain


def _wrap(node: Any) -> Any:
    if isinstance(node, Mapping):
        return Config({k: _wrap(v) for k, v in node.items()})
    if isinstance(node, list):
        return [_wrap(v) for v in node]
    return node


def free_form_keys(node: Mapping, prefix: str = "") -> set[str]:
    """Dotted keys whose default is an empty mapping: their contents are not checked against a schema."""
    keys = set()
    for key, value in node.items():
        if isinstance(value, Mapping):
            keys |= {f"{prefix}{key}"} if not value else free_form_keys(value, f"{prefix}{key}.")
    return keys


def _deep_update(base: dict, layer: Mapping) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _merge(base: dict, layer: Mapping, free: set[str], prefix: str = "") -> None:
    """Merge ``layer`` into ``base`` in place, refusing keys that ``base`` lacks (outside free-form keys)."""
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in base and dotted in RENAMED:  # configs saved before the rename (a trained run's) still load
            log.warning("config key '%s' was renamed '%s': read as that", dotted, RENAMED[dotted])
            dotted = RENAMED[dotted]
            key = dotted.rsplit(".", 1)[-1]
        if key not in base:
            raise unknown_key(dotted, base.keys())
        current = base[key]
        if dotted in free:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{dotted}' must be a mapping, got {value!r}")
            _deep_update(current, value)
        elif isinstance(current, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{dotted}' must be a mapping, got {value!r}")
            _merge(current, value, free, prefix=f"{dotted}.")
        elif isinstance(value, Mapping) and value:
            nested = next(iter(value))
            raise ConfigError(f"unknown config key '{dotted}.{nested}' ('{dotted}' holds a value, not a section)")
        else:
            base[key] = copy.deepcopy(value)


def parse_override(text: str) -> dict:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}``.

    The value is parsed as YAML, except for a key that takes a string: it keeps its raw text
    (``experiment=0123`` stays '0123', ``submit.name=on`` stays 'on'), unquoted if quoted; ``null``,
    ``~`` or nothing is null where the key may be null.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    if not dotted:
        raise ConfigError(f"override '{text}' has an empty key")
    rule, raw = text_rule(dotted), raw.strip()
    if rule is None or raw[:1] in ("'", '"'):
        value: Any = _yaml(raw, f"override '{text}'") if raw else None
    else:
        value = None if rule.null and raw in ("", "~", "null", "Null", "NULL") else raw
    nested: dict = {}
    node = nested
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return dict(data)


def _file_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """``path``'s layer after those of its ``base`` chain (a chain that loops back is an error)."""
    if path in seen:
        raise ConfigError(f"config base chain loops: {' -> '.join(str(p) for p in (*seen, path))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    layers = _file_layers((path.parent / base).resolve(), (*seen, path)) if base else []
    return [*layers, data]


def _resolve_paths(cfg: dict, root: Path) -> None:
    """Replace ``{key}`` in each ``paths`` value by that key's resolved path (``{data_root}``, ``{runs}``, ...)
    and make relative paths absolute under ``root``. A chain of references that loops is a ConfigError."""
    paths = cfg["paths"]
    given = {key: str(value) for key, value in paths.items()}
    resolved: dict[str, str] = {}

    def resolve(key: str, chain: tuple[str, ...]) -> str:
        if key in chain:
            raise ConfigError(f"paths.{key} refers to itself: {' -> '.join(f'paths.{k}' for k in (*chain, key))}")
        if key not in resolved:
            text = re.sub(r"\{(\w+)\}", lambda m: resolve(m.group(1), (*chain, key)) if m.group(1) in given
                          else m.group(0), given[key])
            path = Path(text)
            resolved[key] = str(path if path.is_absolute() else (root / path))
        return resolved[key]

    for key in given:
        paths[key] = resolve(key, ())


ADAPTED = "adapted"  # features.weights: the encoder stage 02b wrote under adapt.name


def _resolve_adapted_weights(cfg: dict) -> None:
    """``features.weights: adapted`` names stage 02b's output for this config's ``adapt.name``:
    ``{processed}/encoders/{adapt.name}/model.safetensors`` (paths already resolved)."""
    if cfg["features"]["weights"] == ADAPTED:
        cfg["features"]["weights"] = str(Path(cfg["paths"]["processed"]) / "encoders" / str(cfg["adapt"]["name"])
                                         / "model.safetensors")


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    root: str | Path | None = None,
) -> Config:
    """Load defaults, then ``path`` (and its ``base`` chain), then dotted ``overrides``, and check the
    result whole: a bad value raises a one-line :class:`ConfigError` naming its key.

    Relative paths in ``paths`` are resolved against ``root`` (default: the repository root).
    """
    cfg = copy.deepcopy(defaults())
    free = free_form_keys(cfg)
    layers = _file_layers(Path(path).resolve()) if path else []
    layers += [parse_override(text) for text in overrides]
    for layer in layers:
        _merge(cfg, layer, free)
    check_config(cfg)
    _resolve_paths(cfg, Path(root).resolve() if root else REPO_ROOT)
    _resolve_adapted_weights(cfg)
    return _wrap(cfg)


def with_overrides(cfg: Mapping, overrides: Iterable[str]) -> Config:
    """A loaded config with dotted ``overrides`` on top, checked whole again (its paths stay as resolved:
    an override of ``paths.*`` is refused, since the paths derived from it would not follow)."""
    plain = _plain(cfg)
    free = free_form_keys(defaults())
    for text in overrides:
        layer = parse_override(text)
        if "paths" in layer:
            raise ConfigError(f"override '{text}': paths cannot change on a loaded config")
        _merge(plain, layer, free)
    check_config(plain)
    _resolve_adapted_weights(plain)
    return _wrap(plain)


def save_config(cfg: Mapping, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a stage's outputs (atomically)."""
    from ubc_ocean.io_utils import atomic_write_text

    out = Path(out_dir) / name
    atomic_write_text(out, yaml.safe_dump(_plain(cfg), sort_keys=False))
    return out
