"""What an adaptation run leaves in ``{processed}/encoders/{adapt.name}/``: the merged weights, the record, the
loss curve (CSV and PNG), and whether the run learned anything.

``model.safetensors`` holds the plain timm model's state dict (LoRA already folded in), so
``features.weights`` can name it like any downloaded file: stages 03, 05 and 07 read it with no adaptation
library, and the embeddings folders and the feature identity follow from its sha256.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import pandas as pd
from torch import nn

from ubc_ocean.io_utils import atomic_path, atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "record.json"
CURVE_CSV = "loss_curve.csv"
CURVE_PNG = "loss_curve.png"
LIBRARIES = ("torch", "timm", "lightly", "peft", "albumentations", "safetensors")
COLLAPSE_RATIO = 0.2  # final feature spread below this share of the first: collapsed


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str | None]:
    """The installed versions of ``names`` (``None``: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def save_weights(model: nn.Module, folder: Path) -> Path:
    """The timm ``model``'s state dict as ``model.safetensors`` (written atomically)."""
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    path = folder / WEIGHTS_FILE
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path


def learning_verdict(history: Sequence[Mapping]) -> dict:
    """Whether the run learned: its loss fell (the last quarter of the loss records below the first quarter)
    and its features did not collapse (final spread at least ``COLLAPSE_RATIO`` of the first). Too few
    records to tell is not learned."""
    records = [row for row in history if "loss" in row]
    if len(records) < 2:
        return {"learned": False, "why": f"{len(records)} loss record(s): too short a run to tell"}
    quarter = max(1, len(records) // 4)
    first = sum(row["loss"] for row in records[:quarter]) / quarter
    last = sum(row["loss"] for row in records[-quarter:]) / quarter
    spread_first, spread_last = records[0]["feature_spread"], records[-1]["feature_spread"]
    facts = {"loss_first": first, "loss_last": last, "feature_spread_first": spread_first,
             "feature_spread_last": spread_last}
    if spread_last < COLLAPSE_RATIO * spread_first:
        return {"learned": False, "why": f"collapsed: feature spread fell from {spread_first:.3f} to "
                                         f"{spread_last:.3f}", **facts}
    if not last < first:
        return {"learned": False, "why": f"the loss never fell ({first:.4f} -> {last:.4f})", **facts}
    return {"learned": True, "why": "", **facts}


def write_curve(history: Sequence[Mapping], folder: Path, title: str) -> None:
    """The loss records as ``loss_curve.csv`` and a PNG of loss (and validation accuracy, if any) by step."""
    frame = pd.DataFrame(list(history))
    atomic_write_csv(frame, folder / CURVE_CSV)
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left as it is

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    if "loss" in frame:
        losses = frame.dropna(subset=["loss"])
        ax.plot(losses["step"], losses["loss"], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if "validation_balanced_accuracy" in frame:
        scores = frame.dropna(subset=["validation_balanced_accuracy"])
        twin = ax.twinx()
        twin.plot(scores["step"], scores["validation_balanced_accuracy"], color="tab:orange", marker="o",
                  label="validation BA")
        twin.set_ylabel("validation balanced accuracy")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(folder / CURVE_PNG) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def write_record(folder: Path, record: Mapping) -> Path:
    return atomic_write_text(folder / RECORD_FILE, json.dumps(record, indent=2, default=str))


def read_record(folder: Path) -> dict | None:
    path = folder / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None
