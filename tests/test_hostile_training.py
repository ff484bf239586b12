"""Stages 04-06 under hostile conditions: bad model names and options, retrains that fail, are interrupted or
killed, folders that are not complete models, bags and checkpoints of another feature width, and test
predictions older than their checkpoints or made under another config.

One tiny pipeline (stages 01-05 on the shared stage-00 data) is built per module; each test copies its run
(``runs/demo``) to a run of its own and attacks the copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.builders import REPO, tiny_config, tiny_overrides
from ubc_ocean import embedding_cache, layout
from ubc_ocean.cli import main
from ubc_ocean.config import Config, ConfigError
from ubc_ocean.io_utils import MissingInput, clean_stale_temporaries

ENCODER_WIDTH = 1280  # efficientnet_lite0, the tiny config's encoder


@pytest.fixture(scope="module")
def pipeline(tiny_raw: Config, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides (beyond the tiny ones) of a data root where stages 01-05 ran: ``runs/demo`` holds complete
    abmil and transmil models with their test predictions."""
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.tiling.stage import run as tile

    root = tmp_path_factory.mktemp("hostile")
    extra = [f"paths.raw={tiny_raw.paths.raw}", f"paths.external={tiny_raw.paths.external}"]
    cfg = tiny_config(root, *extra)
    tile(cfg)
    merge(cfg)
    embed(cfg)
    train(cfg)
    infer(cfg)
    return [str(root), *extra]


def _cfg(pipeline: list[str], *extra: str) -> Config:
    return tiny_config(Path(pipeline[0]), *pipeline[1:], *extra)


def _argv(pipeline: list[str], *extra: str) -> list[str]:
    """Command-line arguments of a stage script for this data root."""
    return ["--config", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(Path(pipeline[0]), *pipeline[1:], *extra)]


def _copy_run(pipeline: list[str], name: str, *extra: str) -> Config:
    """A copy of the trained and predicted ``runs/demo`` as experiment ``name``, and its config."""
    source = layout.run_dir(_cfg(pipeline))
    target = source.parent / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return _cfg(pipeline, f"experiment={name}", *extra)


def _checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too: a leftover temporary shows as a change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


# ------------------------------------------------------------------------ stage 04: refused before any work


@pytest.mark.parametrize(("overrides", "culprit", "accepted"), [
    (["mil.models=[transmil]", "mil.model_options.transmil.hiden_dim=64"], "'hiden_dim'", "hidden_dim"),
    (["mil.models=[abmil,transmill]"], "'transmill'", "transmil"),
    (["mil.models=[abmil]", "mil.model_options={transmill: {hidden_dim: 64}}"], "'transmill'", "transmil"),
    (["mil.models=[transmil]", "mil.model_options.transmil.hidden_dim=63"], "hidden_dim (63)", "multiple of heads"),
], ids=["misspelt-option", "misspelt-model", "options-of-unknown-model", "bad-option-value"])
def test_bad_model_config_exits_2_in_seconds_and_leaves_the_run_byte_identical(pipeline, capsys, overrides, culprit,
                                                                                 accepted):
    run = layout.run_dir(_copy_run(pipeline, "victim"))
    before = _checksums(run)
    start = time.perf_counter()
    code = main("ubc_ocean.mil.stage:run", "stage 04", _argv(pipeline, "experiment=victim", *overrides))
    elapsed = time.perf_counter() - start
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("config error: mil.") and culprit in lines[0] and accepted in lines[0]
    assert elapsed < 15  # the models are built, no bag is read (typically well under a second here)
    assert _checksums(run) == before


# --------------------------------------------------------------- stage 04: failed, interrupted, killed retrains


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_or_interrupted_retrain_leaves_the_previous_model_byte_identical(pipeline, monkeypatch, error):
    from ubc_ocean.mil import stage

    cfg = _copy_run(pipeline, "interrupted", "mil.models=[abmil]", "mil.seeds=[3]")
    run = layout.run_dir(cfg)
    before = _checksums(run / "abmil")
    real_fit, calls = stage.fit, []

    def fit_then_fail(*args, **kwargs):  # the first fold's checkpoint is written, then the second fit fails
        calls.append(1)
        if len(calls) == 2:
            raise error("stopped in the middle of a fit")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(stage, "fit", fit_then_fail)
    with pytest.raises(error, match="middle of a fit"):
        stage.run(cfg)
    assert len(calls) == 2
    assert _checksums(run / "abmil") == before and not _temporaries(run)
    assert layout.trained_models(cfg) == ["abmil", "transmil"]


KILLED_RETRAIN = """
import os, signal
from pathlib import Path
from tests.builders import tiny_config
from ubc_ocean.mil import stage

real_replace = os.replace
def replace_then_die(src, dst):  # killed in the swap: the old folder renamed aside, the new one not yet in place
    real_replace(src, dst)
    if Path(dst).name.startswith(".old-"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
stage.run(tiny_config(Path({root!r}), *{extra!r}))
"""


def test_killed_retrain_leaves_the_previous_model_and_the_next_run_cleans_up(pipeline):
    """SIGKILL at the worst moment, between the two renames of the swap; the next run puts the old folder back
    (byte-identical), removes the leftovers, then retrains."""
    from ubc_ocean.mil.stage import run as train

    extra = ["mil.models=[abmil]", "mil.seeds=[3]"]
    cfg = _copy_run(pipeline, "killed", *extra)
    run = layout.run_dir(cfg)
    before = _checksums(run / "abmil")
    code = KILLED_RETRAIN.format(root=pipeline[0], extra=[*pipeline[1:], "experiment=killed", *extra])
    path = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path}, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = _temporaries(run)
    assert [name.split("@")[0] for name in leftovers] == [".old-abmil", ".tmp-abmil"]
    assert (run / leftovers[1] / "complete.json").is_file()  # the whole new training, hidden: never read
    assert layout.trained_models(cfg) == ["transmil"]
    clean_stale_temporaries(run)  # what the next stage-04 run does first
    assert _checksums(run / "abmil") == before and not _temporaries(run)
    train(cfg)
    assert not _temporaries(run)
    assert [p.name for p in layout.model_dir(cfg, "abmil").checkpoints()] == ["fold0_seed3.pt", "fold1_seed3.pt"]
    assert layout.model_dir(cfg, "abmil").is_complete()


# ------------------------------------------------------------- completeness: what stages 05 and 06 will read


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda m: m.completion.unlink(), "no complete.json"),
    (lambda m: m.completion.write_text("{not json"), "unreadable complete.json"),
    (lambda m: m.checkpoint(0, 0).unlink(), "fold0_seed0.pt listed in complete.json is missing"),
    (lambda m: m.checkpoint(1, 0).write_bytes(m.checkpoint(1, 0).read_bytes()[:-10]), "size differs"),
    (lambda m: shutil.copy(m.checkpoint(0, 0), m.checkpoint(0, 7)), "['fold0_seed7.pt'] are not listed"),
    (lambda m: m.outlier.unlink(), "['outlier.json'] missing"),
], ids=["no-record", "bad-record", "missing-checkpoint", "truncated-checkpoint", "extra-checkpoint",
        "missing-report"])
def test_a_damaged_model_folder_is_not_complete(pipeline, damage, reason):
    cfg = _copy_run(pipeline, "damaged")
    model = layout.model_dir(cfg, "transmil")
    assert model.problem() is None
    damage(model)
    assert reason in model.problem()
    assert layout.trained_models(cfg) == ["abmil"]


def test_incomplete_or_foreign_folders_are_skipped_with_a_warning_or_refused_when_named(pipeline, caplog):
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.submit.stage import run as submit

    cfg = _copy_run(pipeline, "partial")
    run = layout.run_dir(cfg)
    layout.model_dir(cfg, "transmil").completion.unlink()  # as a training killed before the swap would leave it
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("not a model")
    with caplog.at_level(logging.WARNING, logger="ubc_ocean.layout"):
        assert set(infer(cfg)) == {"abmil"}
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "transmil: not a complete model: no complete.json" in skipped and "notes: not a complete model" in skipped
    submit(cfg)
    assert layout.ensemble_report_path(cfg).read_text().count('"transmil"') == 0
    for stage in (infer, submit):
        with pytest.raises(ConfigError, match=r"inference.models names 'transmil'.*no complete.json"):
            stage(_cfg(pipeline, "experiment=partial", "inference.models=[transmil]"))


# ------------------------------------------------------------------- feature width: from the encoder, not data


def test_encoder_width_is_found_without_weights():
    from ubc_ocean.encoders.presets import PRESETS
    from ubc_ocean.encoders.registry import create_encoder, encoder_out_dim, resolve_weights, resolved_out_dim

    assert encoder_out_dim("efficientnet_lite0", None, 64) == create_encoder("efficientnet_lite0", None, 64).out_dim
    readme = {"phikon": 768, "phikon_v2": 1024, "lunit_dino_vit_s16": 384, "lunit_dino_vit_s8": 384, "uni": 1024,
              "ctranspath": 768, "h_optimus_0": 1536, "virchow2": 2560}
    assert {name: resolved_out_dim(resolve_weights(name, "hub")) for name in PRESETS} == readme


def test_a_bag_of_another_width_is_refused_by_name_whichever_order(tmp_path):
    from ubc_ocean.mil.bags import load_bags

    paths = {name: tmp_path / f"{name}.h5" for name in ("a_narrow", "b", "c", "d")}
    for name, path in paths.items():
        width = 768 if name == "a_narrow" else ENCODER_WIDTH
        embedding_cache.write_embeddings(path, np.ones((3, width), np.float32), np.zeros((3, 2)), {})
    bags, problems = load_bags(paths, ENCODER_WIDTH)
    assert sorted(bags) == ["b", "c", "d"] and list(problems) == ["a_narrow"]
    assert problems["a_narrow"] == "a_narrow: feature width 768, expected 1280 (the encoder's)"


def _narrow(path: Path) -> None:
    """Rewrite an embeddings h5 with 768-wide features (as if made by another encoder)."""
    features, coords, attrs = embedding_cache.read_embeddings(path)
    embedding_cache.write_embeddings(path, np.ones((len(features), 768), np.float32), coords, attrs)


def test_stages_04_and_05_leave_out_a_narrow_bag_by_name_and_use_the_others(pipeline, tmp_path):
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train

    processed = tmp_path / "processed"
    shutil.copytree(_cfg(pipeline).paths.processed, processed)
    cfg = _cfg(pipeline, f"paths.processed={processed}", "experiment=width", "mil.models=[abmil]")
    table = layout.read_training_table(cfg)
    root = layout.embeddings_root(cfg)
    first = table.iloc[0]  # the bag read first, which used to decide the width of all the others
    _narrow(layout.embedding_path(root, first.source, first.image_id))
    test_h5 = sorted((root / "test").glob("*.h5"))[0]
    _narrow(test_h5)

    train(cfg)
    failures = pd.read_csv(layout.run_dir(cfg) / "failures_04.csv")
    assert dict(zip(failures.slide, failures.message, strict=True)) == {
        first.slide_id: f"{first.slide_id}: feature width 768, expected 1280 (the encoder's)"}
    oof = layout.model_dir(cfg, "abmil").read_oof()
    assert set(oof.slide_id) == set(table.slide_id[table.fold >= 0]) - {first.slide_id}

    predictions = pd.read_csv(infer(cfg)["abmil"], dtype={"image_id": str})
    failures = pd.read_csv(layout.run_dir(cfg) / "failures_05.csv")
    assert f"test/{test_h5.stem}: feature width 768, expected 1280" in " ".join(failures.message)
    assert sorted(predictions.image_id) == sorted(p.stem for p in (root / "test").glob("*.h5") if p != test_h5)


def test_stage_05_refuses_checkpoints_of_another_width(pipeline, capsys):
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil import create_mil_model
    from ubc_ocean.mil.checkpoint import save_checkpoint

    cfg = _copy_run(pipeline, "mixed")
    source, narrow = layout.model_dir(cfg, "abmil"), layout.ModelDir(layout.run_dir(cfg) / "narrow")
    shutil.copytree(source.path, narrow.path)
    record = source.read_completion()
    torch.manual_seed(0)
    for path in narrow.checkpoints():  # a complete model trained on 768-wide features
        model = create_mil_model("abmil", 768, len(record["classes"]), hidden_dim=64, attention_dim=32)
        save_checkpoint(path, model, record["classes"], {})
    narrow.write_completion("narrow", record["folds"], record["seeds"], in_dim=768)
    assert narrow.is_complete()
    before = _checksums(layout.run_dir(cfg))

    with pytest.raises(ConfigError, match=r"narrow/fold0_seed0.pt takes 768-wide features, but features.encoder "
                                          r"'efficientnet_lite0' makes 1280-wide ones"):
        infer(_cfg(pipeline, "experiment=mixed", "inference.models=[narrow]"))
    code = main("ubc_ocean.inference.stage:run", "stage 05", _argv(pipeline, "experiment=mixed"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert ("checkpoints disagree on the feature width: abmil/fold0_seed0.pt takes 1280, narrow/fold0_seed0.pt "
            "takes 768") in lines[0]
    assert _checksums(layout.run_dir(cfg)) == before  # refused before anything was written


# --------------------------------------------------------------------------- stage 06: stale test predictions


def test_stage_06_refuses_predictions_older_than_the_checkpoints(pipeline):
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.submit.stage import run as submit

    cfg = _copy_run(pipeline, "stale")
    abmil = layout.model_dir(cfg, "abmil")
    old = {p.name: p.read_bytes() for p in abmil.path.glob("test_predictions*")}
    assert sorted(old) == ["test_predictions.csv", "test_predictions.json"]
    submit(cfg)

    train(_cfg(pipeline, "experiment=stale", "mil.models=[abmil]", "mil.seeds=[4]"))  # retrained after stage 05
    with pytest.raises(MissingInput, match=r"abmil holds no test predictions: run stage 05 first"):
        submit(cfg)
    for name, data in old.items():  # the old predictions put back beside the new checkpoints
        (abmil.path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=r"model 'abmil': test_predictions.csv was made from other checkpoints"):
        submit(cfg)
    (abmil.path / "test_predictions.json").unlink()
    with pytest.raises(ConfigError, match=r"model 'abmil': test_predictions.csv has no record"):
        submit(cfg)

    infer(cfg)
    submit(cfg)  # predictions made from the new checkpoints are used


def test_stage_06_refuses_predictions_made_under_another_config(pipeline, capsys):
    cfg = _copy_run(pipeline, "otherconfig")
    argv = _argv(pipeline, "experiment=otherconfig", "features.tta=flips")
    code = main("ubc_ocean.submit.stage:run", "stage 06", argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert "model 'abmil': test_predictions.csv was made from test features with tta 'none', the config gives " \
           "'flips'" in lines[0]
    assert "rerun stage 05" in lines[0]
    assert not layout.ensemble_report_path(cfg).exists()


def test_a_model_that_did_not_learn_is_flagged_in_metrics_and_log(pipeline, caplog):
    """A model trained with a learning rate too small to move it scores at chance: stage 04 still writes it,
    sets ``learned: false`` in ``metrics.json`` and warns, naming the training keys to check; every
    checkpoint records its resolved training keys."""
    from ubc_ocean.mil.stage import run as train

    cfg = _cfg(pipeline, "experiment=stuck", "mil.models=[abmil]", "mil.model_training.abmil.lr=1e-12",
               "mil.epochs=1")
    with caplog.at_level("WARNING", logger="ubc_ocean.mil.stage"):
        train(cfg)
    metrics = json.loads((layout.model_dir(cfg, "abmil").path / "metrics.json").read_text())
    assert metrics["learned"] is False
    assert metrics["balanced_accuracy"] <= metrics["chance_balanced_accuracy_p99"]
    assert metrics["training"]["lr"] == 1e-12 and metrics["training"]["epochs"] == 1
    assert "abmil did not learn" in caplog.text and "mil.model_training.abmil" in caplog.text
    payload = torch.load(layout.model_dir(cfg, "abmil").checkpoints()[0], weights_only=False)
    assert payload["training"] == metrics["training"]
