"""Device and precision choices: CUDA with autocast when present, CPU otherwise; never hard-coded."""

from __future__ import annotations

import contextlib
import logging
import random
import re

import numpy as np
import torch

log = logging.getLogger(__name__)
_warned: set[int] = set()  # GPUs already reported as unusable in this process


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build compiled for ``arch_list`` (``torch.cuda.get_arch_list()``: ``sm_XY`` machine
    code, ``compute_XY`` PTX) runs kernels on a GPU of compute ``capability``: machine code of the same
    major version and no higher minor one (an ``sm_XYa``/``sm_XYf`` variant only on exactly X.Y), or PTX of
    no higher version, which the driver compiles for newer GPUs. A list without CUDA architectures (empty,
    or a ROCm build's ``gfx...``) says nothing, and counts as yes."""
    matches = [m for m in (re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch) for arch in arch_list) if m]
    if not matches:
        return True
    for match in matches:
        kind, major, minor, variant = match[1], int(match[2]), int(match[3]), match[4]
        if variant:
            ok = (major, minor) == capability
        elif kind == "sm":
            ok = major == capability[0] and minor <= capability[1]
        else:
            ok = (major, minor) <= capability
        if ok:
            return True
    return False


def gpu_problem(index: int) -> str | None:
    """Why GPU ``index`` cannot run this torch build's kernels (e.g. a P100, compute 6.0, under a CUDA 12.8
    build without Pascal code: ``torch.cuda.is_available()`` is true, and the first kernel fails), or None."""
    capability = tuple(torch.cuda.get_device_capability(index))
    arch_list = list(torch.cuda.get_arch_list())
    if arch_supported(capability, arch_list):
        return None
    return (f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability {capability[0]}.{capability[1]}) "
            f"has no kernels in this torch {torch.__version__} build (CUDA architectures {' '.join(arch_list)})")


def usable_gpus() -> list[torch.device]:
    """The visible GPUs this torch build can run on; each one it cannot is logged once, as a warning."""
    if not torch.cuda.is_available():
        return []
    usable = []
    for index in range(torch.cuda.device_count()):
        problem = gpu_problem(index)
        if problem is None:
            usable.append(torch.device("cuda", index))
        elif index not in _warned:
            _warned.add(index)
            log.warning("%s: not used (runtime.device auto); install a torch build for it, or expect CPU speed",
                        problem)
    return usable


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first GPU this torch build can run on (:func:`usable_gpus`), else the CPU;
    ``cpu``/``cuda``/``cuda:N`` are taken as given, a GPU only if it exists and can run the build's kernels."""
    if name == "auto":
        gpus = usable_gpus()
        return gpus[0] if gpus else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPUs are visible")
        problem = gpu_problem(index)
        if problem is not None:
            raise RuntimeError(f"device {name!r} asked for, but {problem}; set runtime.device to auto or cpu")
    return device


def visible_devices(name: str = "auto") -> list[torch.device]:
    """Every device a data-parallel consumer should run on: with ``auto`` each GPU this torch build can run
    on (:func:`usable_gpus`), else the CPU; any other name is that one device (:func:`resolve_device`)."""
    if name == "auto":
        return usable_gpus() or [torch.device("cpu")]
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
