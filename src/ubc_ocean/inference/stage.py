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

from ubc_ocean import layout
from ubc_ocean.config import save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.features import cache
from ubc_ocean.features.embed import encoder_from_config, prepare_encoder
from ubc_ocean.features.fused import embed_slide_streaming
from ubc_ocean.io_utils import FailureLog, atomic_write_csv, clean_stale_temporaries
from ubc_ocean.mil.bags import BagError, check_bag, load_bags
from ubc_ocean.mil.checkpoint import load_checkpoint
from ubc_ocean.mil.predict import predict_bags, prediction_frame
from ubc_ocean.mil.train import model_training_config
from ubc_ocean.outliers import SCORE_NAMES, FeatureSpaceDetector
from ubc_ocean.parallel import TaskResult, run_tasks, select_shard, shard_output
from ubc_ocean.slides import SlideError
from ubc_ocean.sources import TEST, SlideSpec, competition_specs

log = logging.getLogger(__name__)
STAGE = "05_infer_test"


def embed_test_slide(spec: SlideSpec, cfg: Mapping, root: Path) -> TaskResult:
    """Fused tiling + embedding of one test image into its h5 (skipped when already complete)."""
    out = layout.embedding_path(root, spec.source, spec.image_id)
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
    attrs = layout.embedding_attrs(cfg, encoder.name, encoder.weights_id, encoder.input_size, spec.slide_id,
                                   is_tma=bool(info["is_tma"]))
    cache.write_embeddings(out, features, coords, attrs)
    return TaskResult(spec.slide_id, "done", info.get("fallback", ""), count=len(features))


def model_names(cfg: Mapping) -> list[str]:
    """Models to predict with: ``inference.models`` or every model of the run that holds checkpoints."""
    chosen = cfg["inference"]["models"]
    found = layout.trained_models(cfg)
    if chosen:
        missing = sorted(set(chosen) - set(found))
        if missing:
            raise FileNotFoundError(f"no checkpoints for {missing} in {layout.run_dir(cfg)} (run stage 04)")
        return list(chosen)
    if not found:
        raise FileNotFoundError(f"no checkpoints in {layout.run_dir(cfg)}: run stage 04 first")
    return found


def predict_model(model: layout.ModelDir, slide_ids: list[str], bags: dict[str, torch.Tensor],
                  cfg: Mapping) -> pd.DataFrame:
    """Probabilities and outlier scores averaged over every fold x seed checkpoint of one model."""
    if not slide_ids:  # every image of this shard failed, or the shard is empty: an empty table, no crash
        classes = list(cfg["data"]["classes"])
        return pd.DataFrame(columns=["image_id", *classes, *(f"score_{name}" for name in SCORE_NAMES)])
    device = resolve_device(cfg["runtime"]["device"])
    checkpoints = model.checkpoints()
    training = model_training_config(cfg["mil"], model.name)
    cap, precision = int(training["max_instances_predict"]), str(training["precision"])
    total = None
    for path in checkpoints:
        network, payload = load_checkpoint(path, device)
        outputs = predict_bags(network, [bags[s] for s in slide_ids], device, precision, cap)
        detector = FeatureSpaceDetector.from_dict(payload["detector"]) if "detector" in payload else None
        frame = prediction_frame(outputs, payload["classes"], detector)
        total = frame if total is None else total + frame
    mean = total / len(checkpoints)
    mean.insert(0, "image_id", [s.split("/", 1)[1] for s in slide_ids])
    return mean


def run(cfg: Mapping) -> dict[str, Path]:
    """Embed (this shard's share of) the test images, then predict them with every model."""
    root = layout.embeddings_root(cfg)
    test_root = root / TEST
    test_root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(test_root)
    out = layout.run_dir(cfg)
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
    bags, problems = load_bags({s.slide_id: layout.embedding_path(root, TEST, s.image_id) for s in specs})
    already_recorded = set(failures.read()["slide"])
    for slide_id, message in problems.items():
        if slide_id not in already_recorded:
            failures.record(slide_id, message)
    slide_ids = sorted(bags)
    written = {}
    for name in model_names(cfg):
        model = layout.model_dir(cfg, name)
        frame = predict_model(model, slide_ids, bags, cfg)
        path = model.predictions(shard)
        atomic_write_csv(frame, path)
        written[name] = path
        log.info("stage 05: %s predicted %d test images -> %s", name, len(frame), path)
    if failures.count:
        log.warning("stage 05: %d test images without prediction (see %s); stage 06 labels them",
                    failures.count, failures.path)
    return written
