"""Stage 05: embed each raw test image in one streaming pass and predict it with every trained model.

Test embeddings are cached beside the training ones (``{embeddings}/test/{image_id}.h5``) so a rerun or a
second model costs no re-embedding; tiles are never written. Per model it writes
``{run}/{model}/test_predictions.csv``: image_id, one probability column per class (mean over every
fold x seed checkpoint), and the outlier scores.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from ubc_ocean.config import save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.features import cache
from ubc_ocean.features.embed import prepare_encoder
from ubc_ocean.features.fused import embed_slide_streaming
from ubc_ocean.features.stage import encoder_from_config
from ubc_ocean.io_utils import FailureLog, atomic_write_csv, clean_stale_temporaries
from ubc_ocean.mil.bags import BagError, check_bag, load_bags
from ubc_ocean.mil.checkpoint import load_checkpoint
from ubc_ocean.mil.stage import embeddings_root_from_config, model_training_config, prediction_frame, run_dir
from ubc_ocean.mil.train import predict_bags
from ubc_ocean.outliers import SCORE_NAMES, FeatureSpaceDetector
from ubc_ocean.parallel import TaskResult, run_tasks, select_shard, shard_output
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import TEST, SlideSpec, competition_specs
from ubc_ocean.tiling import store
from ubc_ocean.tiling.tiler import check_tiling_config

log = logging.getLogger(__name__)
STAGE = "05_infer_test"
PREDICTIONS_FILE = "test_predictions.csv"


def embed_test_slide(spec: SlideSpec, cfg: Mapping, root: Path) -> TaskResult:
    """Fused tiling + embedding of one test image into its h5 (skipped when already complete)."""
    out = cache.embedding_path(root, spec.source, spec.image_id)
    if cache.is_complete(out):
        return TaskResult(spec.slide_id, "skipped")
    encoder = encoder_from_config(cfg)
    device = resolve_device(cfg["runtime"]["device"])
    prepare_encoder(encoder, device)
    try:
        features, coords, info = embed_slide_streaming(spec, cfg, encoder, device)
        check_bag(features, spec.slide_id)
    except (SlideError, OSError, ValueError, BagError) as err:
        return TaskResult(spec.slide_id, "failed", f"{spec.path.name}: {err}")
    cache.write_embeddings(out, features, coords, {
        "encoder": encoder.name, "weights_sha256": encoder.weights_id, "input_size": encoder.input_size,
        "tile_size": int(cfg["tiling"]["tile_size"]), "magnification": float(cfg["tiling"]["target_magnification"]),
        "slide_id": spec.slide_id, "tiling_key": store.tiling_key(cfg), "is_tma": bool(info["is_tma"]),
    })
    return TaskResult(spec.slide_id, "done", info.get("fallback", ""), count=len(features))


def model_names(cfg: Mapping, folder: Path) -> list[str]:
    """Models to predict with: ``inference.models`` or every model folder that holds checkpoints."""
    chosen = cfg["inference"]["models"]
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("fold*_seed*.pt")))
    if chosen:
        missing = sorted(set(chosen) - set(found))
        if missing:
            raise FileNotFoundError(f"no checkpoints for {missing} in {folder} (run stage 04)")
        return list(chosen)
    if not found:
        raise FileNotFoundError(f"no checkpoints in {folder}: run stage 04 first")
    return found


def predict_model(model_dir: Path, slide_ids: list[str], bags: dict[str, torch.Tensor], cfg: Mapping) -> pd.DataFrame:
    """Probabilities and outlier scores averaged over every fold x seed checkpoint of one model."""
    if not slide_ids:  # every image of this shard failed, or the shard is empty: an empty table, no crash
        classes = list(cfg["data"]["classes"])
        return pd.DataFrame(columns=["image_id", *classes, *(f"score_{name}" for name in SCORE_NAMES)])
    device = resolve_device(cfg["runtime"]["device"])
    checkpoints = sorted(model_dir.glob("fold*_seed*.pt"))
    training = model_training_config(cfg["mil"], model_dir.name)
    cap, precision = int(training["max_instances_predict"]), str(training["precision"])
    total = None
    for path in checkpoints:
        model, payload = load_checkpoint(path, device)
        outputs = predict_bags(model, [bags[s] for s in slide_ids], device, precision, cap)
        detector = FeatureSpaceDetector.from_dict(payload["detector"]) if "detector" in payload else None
        frame = prediction_frame(outputs, payload["classes"], detector)
        total = frame if total is None else total + frame
    mean = total / len(checkpoints)
    mean.insert(0, "image_id", [s.split("/", 1)[1] for s in slide_ids])
    return mean


def run(cfg: Mapping) -> dict[str, Path]:
    """Embed (this shard's share of) the test images, then predict them with every model."""
    check_tiling_config(cfg["tiling"])
    root = embeddings_root_from_config(cfg)
    test_root = root / TEST
    test_root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(test_root)
    out = run_dir(cfg)
    save_config(cfg, out, "config_05.yaml")
    shard = cfg["runtime"]["shard"]
    specs = select_shard(competition_specs(cfg, TEST), shard, key=lambda s: s.slide_id)
    failures = FailureLog(shard_output(out, "failures_05.csv", shard), STAGE)
    failures.path.unlink(missing_ok=True)
    task = functools.partial(embed_test_slide, cfg=cfg, root=root)
    for result in run_tasks(specs, task, workers=int(cfg["runtime"]["workers"]), desc="test slides"):
        if result.status == "failed":
            log.error("%s: %s", result.item, result.message)
            failures.record(result.item, result.message)
    bags, problems = load_bags({s.slide_id: cache.embedding_path(root, TEST, s.image_id) for s in specs})
    already_recorded = set(failures.read()["slide"])
    for slide_id, message in problems.items():
        if slide_id not in already_recorded:
            failures.record(slide_id, message)
    slide_ids = sorted(bags)
    written = {}
    for name in model_names(cfg, out):
        frame = predict_model(out / name, slide_ids, bags, cfg)
        path = shard_output(out / name, PREDICTIONS_FILE, shard)
        atomic_write_csv(frame, path)
        written[name] = path
        log.info("stage 05: %s predicted %d test images -> %s", name, len(frame), path)
    if failures.count:
        log.warning("stage 05: %d test images without prediction (see %s); stage 06 labels them",
                    failures.count, failures.path)
    return written


def read_test_predictions(model_dir: Path) -> pd.DataFrame:
    """All shards of one model's test predictions, as one table."""
    paths = sorted(model_dir.glob("test_predictions*.csv"))
    if not paths:
        raise FileNotFoundError(f"no test predictions in {model_dir}: run stage 05")
    frame = pd.concat([pd.read_csv(p, dtype={"image_id": str}) for p in paths], ignore_index=True)
    repeated = frame["image_id"][frame["image_id"].duplicated()].unique().tolist()
    if repeated:
        raise ValueError(f"{model_dir}: image ids predicted more than once across {[p.name for p in paths]}: "
                         f"{repeated[:5]} (rerun stage 05 with one sharding)")
    return frame
