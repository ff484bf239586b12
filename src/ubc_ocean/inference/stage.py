"""Stage 05: embed each raw test image in one streaming pass and predict it with every trained model.

Test embeddings are cached beside the training ones (``{embeddings}/test/{image_id}.h5``) so a rerun or a
second model costs no re-embedding; tiles are never written. Per model it writes
``{predictions}/{experiment}/{model}/test_predictions.csv`` (``paths.predictions``: the run folder by
default): image_id, one probability column per class (mean over every fold x seed checkpoint), and the
outlier scores; beside it ``test_predictions.json`` records the checkpoints (sha256) and the test
features they were made from, which stage 06 checks. The trained run is only read (it may be read-only).

Only complete models are used (``layout.chosen_models``), and before any image is embedded every
checkpoint's ``in_dim`` must agree with the others' and with the configured encoder's feature width.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from ubc_ocean import layout
from ubc_ocean.config import ConfigError, save_config
from ubc_ocean.device import resolve_device
from ubc_ocean.features import cache
from ubc_ocean.features.embed import encoder_from_config, prepare_encoder
from ubc_ocean.features.fused import embed_slide_streaming
from ubc_ocean.io_utils import FailureLog, atomic_write_csv, clean_stale_temporaries
from ubc_ocean.mil.bags import BagError, check_bag, load_bags
from ubc_ocean.mil.checkpoint import checkpoint_in_dim, load_checkpoint
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
    """Models to predict with: ``inference.models`` (each a complete model, else a ``ConfigError``) or every
    complete model of the run (other folders skipped with a warning)."""
    names = layout.chosen_models(cfg)
    if not names:
        raise FileNotFoundError(f"no complete trained model in {layout.run_dir(cfg)}: run stage 04 first")
    return names


def check_feature_widths(cfg: Mapping, names: list[str], width: int) -> None:
    """Every checkpoint of ``names`` must take ``width``-wide features (the configured encoder's), and so
    agree with each other: a ``ConfigError`` naming the checkpoints (and the encoder) otherwise."""
    widths = {f"{name}/{path.name}": checkpoint_in_dim(path)
              for name in names for path in layout.model_dir(cfg, name).checkpoints()}
    first = next(iter(widths.items()), None)
    other = next(((key, dim) for key, dim in widths.items() if first and dim != first[1]), None)
    if first and other:
        raise ConfigError(f"the checkpoints disagree on the feature width: {first[0]} takes {first[1]}, {other[0]} "
                          f"takes {other[1]} (trained on different encoders' features); choose models with "
                          "inference.models or retrain (stage 04)")
    if first and first[1] != width:
        raise ConfigError(f"{first[0]} takes {first[1]}-wide features, but features.encoder "
                          f"{cfg['features']['encoder']!r} makes {width}-wide ones: set the encoder the models "
                          "were trained with, or retrain them (stage 04)")


def predict_model(model: layout.ModelDir, slide_ids: list[str], bags: dict[str, torch.Tensor],
                  cfg: Mapping) -> tuple[pd.DataFrame, dict[str, str]]:
    """Probabilities and outlier scores averaged over every fold x seed checkpoint of one model, and the
    sha256 of each checkpoint as it was read (``{file name: sha256}``)."""
    checkpoints = model.checkpoints()
    if not slide_ids:  # every image of this shard failed, or the shard is empty: an empty table, no crash
        classes = list(cfg["data"]["classes"])
        used = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in checkpoints}
        return pd.DataFrame(columns=["image_id", *classes, *(f"score_{name}" for name in SCORE_NAMES)]), used
    device = resolve_device(cfg["runtime"]["device"])
    training = model_training_config(cfg["mil"], model.name)
    cap, precision = int(training["max_instances_predict"]), str(training["precision"])
    total, used = None, {}
    for path in checkpoints:
        data = path.read_bytes()  # hashed and loaded from the same bytes
        used[path.name] = hashlib.sha256(data).hexdigest()
        network, payload = load_checkpoint(io.BytesIO(data), device)
        outputs = predict_bags(network, [bags[s] for s in slide_ids], device, precision, cap)
        detector = FeatureSpaceDetector.from_dict(payload["detector"]) if "detector" in payload else None
        frame = prediction_frame(outputs, payload["classes"], detector)
        total = frame if total is None else total + frame
    mean = total / len(checkpoints)
    mean.insert(0, "image_id", [s.split("/", 1)[1] for s in slide_ids])
    return mean, used


def run(cfg: Mapping) -> dict[str, Path]:
    """Embed (this shard's share of) the test images, then predict them with every model."""
    layout.require_writable(cfg, "processed", "predictions")  # trained models may be read-only (Kaggle)
    names = model_names(cfg)
    width = layout.feature_width(cfg)
    check_feature_widths(cfg, names, width)
    root = layout.embeddings_root(cfg)
    test_root = root / TEST
    test_root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(test_root)
    out = layout.predictions_dir(cfg)
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
    bags, problems = load_bags({s.slide_id: layout.embedding_path(root, TEST, s.image_id) for s in specs}, width)
    already_recorded = set(failures.read()["slide"])
    for slide_id, message in problems.items():
        if slide_id not in already_recorded:
            failures.record(slide_id, message)
    slide_ids = sorted(bags)
    written = {}
    features = layout.test_features_fingerprint(cfg)
    for name in names:
        model = layout.model_dir(cfg, name)
        record = model.predictions_record(shard)
        record.unlink(missing_ok=True)  # predictions without their record are refused by stage 06
        frame, used = predict_model(model, slide_ids, bags, cfg)
        path = model.predictions(shard)
        atomic_write_csv(frame, path)
        model.write_predictions_record(shard, used, features)
        written[name] = path
        log.info("stage 05: %s predicted %d test images -> %s", name, len(frame), path)
    if failures.count:
        log.warning("stage 05: %d test images without prediction (see %s); stage 06 labels them",
                    failures.count, failures.path)
    return written
