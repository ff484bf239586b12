"""Device and precision choices: CUDA with autocast when present, CPU otherwise; never hard-coded."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
    return device


def visible_devices(name: str = "auto") -> list[torch.device]:
    """Every device a data-parallel consumer should run on: with ``auto`` each visible GPU (``cuda:0`` ...
    ``cuda:{n-1}``), else the CPU; any other name is that one device (:func:`resolve_device`)."""
    if name == "auto" and torch.cuda.is_available():
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [resolve_device(name)]


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means full fp32.

    ``auto`` is bf16 where the GPU computes it natively (Ampere and newer) and fp16 elsewhere (T4, P100,
    V100: emulated bf16 is slower there than fp16, which :func:`grad_scaler` then guards in training).
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r} (auto | fp32 | bf16 | fp16)")
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "fp16":
        return torch.float16
    with torch.cuda.device(device):
        supported = torch.cuda.is_bf16_supported(including_emulation=precision == "bf16")
    return torch.bfloat16 if supported else torch.float16


def grad_scaler(device: torch.device, precision: str = "auto") -> torch.amp.GradScaler:
    """A loss scaler, active only when training autocasts to fp16 (whose small gradients underflow)."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, precision) == torch.float16)


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
