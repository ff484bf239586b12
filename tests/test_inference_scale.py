"""Stage 05 at test-set scale: the pipelined fused inference, the time budget, the provisional submission
and the feature identity checks, on the tiny synthetic data (real PNGs, the real default encoder)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.builders import LEAN, run_script, tiny_config
from ubc_ocean import embedding_cache, layout
from ubc_ocean.config import ConfigError
from ubc_ocean.features.stage import embed_tile_folder
from ubc_ocean.inference.budget import BudgetImage, BudgetPlanner
from ubc_ocean.inference.decoding import SlideJob
from ubc_ocean.inference.fused import embed_slide_streaming
from ubc_ocean.inference.pipeline import FusedPipeline
from ubc_ocean.sources import TEST, TRAIN, competition_specs
from ubc_ocean.submit.submission import complete_submission
from ubc_ocean.tiling.stage import tile_slide

CPU = torch.device("cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------------- the pipeline


def test_pipelined_features_equal_in_process_ones_and_a_bad_slide_fails_alone(tiny_raw, tmp_path):
    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "inference.queue_depth=2")
    specs = competition_specs(cfg, TEST)[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = SlideJob(type(specs[0])(**{**specs[0].__dict__, "image_id": "bad", "path": broken, "thumbnail": None}))
    jobs = [SlideJob(s) for s in specs] + [bad, SlideJob(specs[1], max_tiles=4)]

    def run(workers: int) -> dict:
        pending = iter(jobs)
        pipeline = FusedPipeline(cfg, devices=[CPU], workers=workers)
        assert pipeline.in_process == (workers == 1)
        results = {(r.job.spec.image_id, r.job.describe()): r for r in pipeline.run(lambda: next(pending, None))}
        assert pipeline.stats.tiles == sum(r.tiles for r in results.values()) > 0
        assert 0 < pipeline.stats.busy_fraction <= 1
        return results

    alone, pipelined = run(1), run(2)
    assert set(alone) == set(pipelined) and len(alone) == len(jobs)
    for key, result in alone.items():
        other = pipelined[key]
        assert result.status == other.status
        if result.status == "failed":
            assert key[0] == "bad" and "broken.png" in result.message and "broken.png" in other.message
            continue
        np.testing.assert_array_equal(result.features, other.features)
        np.testing.assert_array_equal(result.coords, other.coords)
        assert result.decode_s > 0 and result.decoded_pixels > 0 and result.encode_s > 0
    assert alone[(specs[1].image_id, "max 4 tiles")].tiles == 4


def test_every_device_gets_a_consumer_and_shares_the_batches(tiny_raw, tmp_path, monkeypatch):
    """Two devices (two CPU consumers standing in for two GPUs): both encode batches, and the features
    equal those of one consumer."""
    from ubc_ocean.inference import pipeline as pipeline_module

    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "features.batch_size=4")
    specs = competition_specs(cfg, TEST)[:3]
    threads: list[int] = []
    real_embed = pipeline_module.embed_batches

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.get_ident())
        time.sleep(0.05)  # a batch takes long enough for the other consumer to take the next one
        yield from real_embed(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "embed_batches", recorded)

    def run(devices: list) -> dict:
        pending = iter([SlideJob(s) for s in specs])
        pipeline = FusedPipeline(cfg, devices=devices, workers=2)
        assert len(pipeline.encoders) == len(devices)
        return {r.job.spec.image_id: r for r in pipeline.run(lambda: next(pending, None))}

    one = run([CPU])
    threads.clear()
    two = run([CPU, CPU])
    assert len(set(threads)) == 2 and len(threads) >= 6  # both consumers encoded batches
    assert set(one) == set(two) == {s.image_id for s in specs}
    for image_id, result in one.items():
        assert result.status == two[image_id].status == "done"
        np.testing.assert_array_equal(result.features, two[image_id].features)


def test_decoders_default_to_one_per_core_when_a_gpu_encodes(tmp_path, monkeypatch):
    """``inference.decoders: auto``: one decoder process per usable core when a GPU encodes (PNG decoding bounds
    the run), ``runtime.workers`` on the CPU; a number is taken as it is, with or without a GPU."""
    from ubc_ocean.inference import pipeline as pipeline_module

    gpu = [torch.device("cuda", 0)]
    assert pipeline_module.decoder_count("auto", 1, gpu, cores=4) == 4
    assert pipeline_module.decoder_count("auto", 1, [CPU, *gpu], cores=16) == 16
    assert pipeline_module.decoder_count("auto", 3, [CPU], cores=16) == 3
    assert pipeline_module.decoder_count(2, 1, gpu, cores=16) == 2
    assert pipeline_module.decoder_count(5, 1, [CPU], cores=2) == 5
    assert pipeline_module.decoder_count("auto", 1, gpu, cores=0) == 1

    monkeypatch.setattr(pipeline_module, "usable_cores", lambda: 6)
    monkeypatch.setattr(pipeline_module, "prepare_encoder", lambda encoder, device: encoder)  # no GPU here
    assert FusedPipeline(tiny_config(tmp_path), devices=gpu).workers == 6
    assert FusedPipeline(tiny_config(tmp_path, "runtime.workers=2"), devices=[CPU]).workers == 2
    assert FusedPipeline(tiny_config(tmp_path, "inference.decoders=3"), devices=[CPU]).workers == 3
    assert FusedPipeline(tiny_config(tmp_path, "inference.decoders=3"), devices=[CPU], workers=1).in_process


def test_usable_cores_are_this_process_s_affinity():
    from ubc_ocean.parallel import usable_cores

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores() == expected >= 1


def test_a_decoder_process_that_cannot_run_stops_the_run_with_the_way_to_see_why(tiny_raw, tmp_path, monkeypatch):
    """A decoder process that Python exits (it could not start: a broken install) fails no slide as if a
    native crash had killed it; it stops the run, and the advice it gives (one process on the CPU) works."""
    from tests import decoder_hooks
    from ubc_ocean.inference import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "decoder_entry", decoder_hooks.exit_at_start)
    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}")
    specs = competition_specs(cfg, TEST)

    def run(pipeline: FusedPipeline) -> list:
        jobs = iter([SlideJob(s) for s in specs])
        return list(pipeline.run(lambda: next(jobs, None)))

    with pytest.raises(RuntimeError, match=r"exited with code 1 .*inference\.decoders=1 runtime\.device=cpu"):
        run(FusedPipeline(cfg, devices=[CPU], workers=2))
    advised = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "inference.decoders=1", "runtime.device=cpu")
    assert {r.status for r in run(FusedPipeline(advised))} == {"done"}


def test_a_stopped_pipelined_run_returns_without_waiting_for_the_batch_being_encoded(tiny_raw, tmp_path,
                                                                                     monkeypatch):
    """A time budget's deadline stops the run at once: the run returns while a consumer is still encoding
    (the thread ends after that batch by itself), and its decoder processes are ended."""
    from ubc_ocean.inference import pipeline as pipeline_module

    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}")
    jobs = iter([SlideJob(s) for s in competition_specs(cfg, TEST)])
    encoding, released, encoded = threading.Event(), threading.Event(), threading.Event()
    real_embed = pipeline_module.embed_batches

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        encoding.set()
        released.wait(60)  # the batch is still being encoded when the run returns: the test lets it end after
        encoded.set()
        yield from real_embed(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "embed_batches", slow)
    pipeline = FusedPipeline(cfg, devices=[CPU], workers=2)
    processes = []
    real_start = pipeline_module._Decoder._start

    def start(self):  # type: ignore[no-untyped-def]
        real_start(self)
        processes.append(self.process)

    monkeypatch.setattr(pipeline_module._Decoder, "_start", start)
    assert list(pipeline.run(lambda: next(jobs, None), should_stop=encoding.is_set)) == []
    assert not encoded.is_set()
    assert processes and not any(process.is_alive() for process in processes)
    released.set()
    assert encoded.wait(60)  # the abandoned batch still goes on, in its own thread, which then ends
    for thread in threading.enumerate():
        if thread.name.startswith("encoder-"):
            thread.join(60)
            assert not thread.is_alive()


def test_row_fraction_decodes_only_the_top_rows(tiny_raw, tmp_path, encoder):
    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "tiling.max_tiles_per_slide=0")
    spec = max(competition_specs(cfg, TEST), key=lambda s: s.expected_size[0] * s.expected_size[1])
    full, _, _ = embed_slide_streaming(SlideJob(spec), cfg, encoder, CPU)
    top, top_coords, info = embed_slide_streaming(SlideJob(spec, row_fraction=0.5), cfg, encoder, CPU)
    limit = spec.expected_size[1] * 0.5
    assert 0 < len(top) < len(full) and info["inference_mode"] == "top 50% of rows"
    assert (top_coords[:, 1] + info["extent"] <= limit).all()


@pytest.fixture(scope="module")
def encoder():
    from ubc_ocean.encoders import create_encoder

    return create_encoder("efficientnet_lite0", input_size=64)


def test_fused_features_match_stage_01_03_features_of_jpeg_tiles(tiny_raw, tmp_path, encoder):
    """The training tiles are JPEG q90 files; fused inference gives its tiles the same round trip, so the
    features of one slide agree (cosine >= 0.995 for every tile; without the round trip they do less well)."""
    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}")  # tiling.format jpg, quality 90
    assert cfg.tiling.format == "jpg"
    spec = max(competition_specs(cfg, TRAIN), key=lambda s: s.expected_size[0] * s.expected_size[1])
    assert tile_slide(spec, cfg).status == "done"
    stored, coords, bad = embed_tile_folder(layout.slide_tiles_dir(cfg, spec.source, spec.image_id), encoder, cfg, CPU)
    fused, fused_coords, _ = embed_slide_streaming(spec, cfg, encoder, CPU)
    raw, _, _ = embed_slide_streaming(spec, tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}",
                                                        "tiling.format=png"), encoder, CPU)
    assert not bad and (fused_coords == coords).all() and len(stored) >= 8
    matched, unmatched = _cosines(stored, fused), _cosines(stored, raw)
    assert matched.min() >= 0.995
    assert matched.mean() > unmatched.mean()


# ----------------------------------------------------------------------------------- the budget


class SimulatedClock:
    """A clock that moves only when told: the costs of a simulated run, never the machine's."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _simulate(images: list[BudgetImage], budget_s: float | None, decode_s_per_mpx: float = 0.5,
              encode_s_per_tile: float = 0.02, tma_s: float = 1.0, tiles_per_mpx: float = 20.0):
    """Run the planner on a simulated machine (one decoder, one consumer, in turn); returns the planner,
    the modes given and the simulated seconds spent."""
    clock = SimulatedClock()
    planner = BudgetPlanner(images, budget_s, full_tiles=200, min_tiles=16, clock=clock)
    given = {}
    while (chosen := planner.next()) is not None:
        image, mode = chosen
        mpx = image.pixels / 1e6 * mode.row_fraction
        decode = tma_s if image.is_tma else decode_s_per_mpx * mpx
        tiles = 30 if image.is_tma else int(min(mode.max_tiles or 200, tiles_per_mpx * mpx))
        clock.now += decode + tiles * encode_s_per_tile
        planner.observe(image, decode, int(mpx * 1e6), tiles, tiles * encode_s_per_tile)
        given[image.key] = mode
    return planner, given, clock.now - 1000.0


IMAGES = [BudgetImage(f"tma{i}", 3000 * 3000, True) for i in range(20)] + \
         [BudgetImage(f"wsi{i}", (i + 1) * 20_000_000, False) for i in range(8)]


def test_without_a_budget_every_image_is_done_at_full_cost():
    planner, given, _ = _simulate(IMAGES, None)
    assert len(given) == len(IMAGES) and all(mode.full for mode in given.values()) and not planner.skipped
    # TMAs first, then WSIs from the smallest: a run cut short has done the most images it could.
    assert sorted(list(given)[:20]) == sorted(f"tma{i}" for i in range(20))
    assert list(given)[20:] == [f"wsi{i}" for i in range(8)]


def test_without_a_budget_the_log_gives_an_eta_that_matches_the_time_left(caplog):
    """On a simulated machine whose costs the planner has measured, its ETA is the time the rest takes."""
    import re

    caplog.set_level("INFO", logger="ubc_ocean.inference.budget")
    _, _, total = _simulate(IMAGES, None)
    etas = []
    for record in caplog.records:
        found = re.search(r"(\d+)/\d+ images done, ([\d.]+) min elapsed; the \d+ not started need about ([\d.]+) min",
                          record.getMessage())
        if found and int(found[1]) > 20:  # the WSIs' rates measured (one done at least)
            etas.append((float(found[2]) * 60, float(found[3]) * 60))
    assert len(etas) >= 3
    for elapsed, eta in etas:
        assert abs(elapsed + eta - total) <= 9  # minutes to one decimal in the message: 6 s each


def test_a_budget_of_half_the_full_cost_ends_in_time_with_every_image_done():
    _, _, full = _simulate(IMAGES, None)
    planner, given, spent = _simulate(IMAGES, full / 2)
    assert spent <= full / 2 * 1.05
    assert len(given) == len(IMAGES) and not planner.skipped
    assert all(given[f"tma{i}"].full for i in range(20))
    largest = given["wsi7"]
    assert largest.max_tiles is not None and largest.row_fraction < 1  # the largest WSIs cost less
    assert given["wsi0"].row_fraction == 1.0


def test_a_budget_too_small_for_everything_skips_the_rest_and_still_ends_in_time():
    _, _, full = _simulate(IMAGES, None)
    planner, given, spent = _simulate(IMAGES, full / 20)
    assert spent <= full / 20 * 1.05
    assert planner.skipped and len(given) + len(planner.skipped) == len(IMAGES)
    kinds = [key[:3] for key in given]
    assert kinds == sorted(kinds, key=lambda kind: kind != "tma")  # the TMAs that were done came first


def test_a_complete_submission_labels_every_unpredicted_id_with_the_fallback():
    table = complete_submission(["3", "1", "2"], {"1": "CC"}, "Other")
    assert table.to_dict("list") == {"image_id": ["3", "1", "2"], "label": ["Other", "CC", "Other"]}


# ----------------------------------------------------------------------------------- stage 05


def _copy_without_test_embeddings(pipeline: Path, tmp_path: Path, *extra: str):
    root = tmp_path / "data"
    shutil.copytree(pipeline, root)
    cfg = tiny_config(root, *LEAN, *extra)
    shutil.rmtree(layout.test_embeddings_root(cfg) / TEST)
    return cfg


def _simulated_s(image: BudgetImage, decoded_pixels: int, tiles: int) -> tuple[float, float]:
    """Simulated (decode, encode) seconds of one image, linear as the planner's model: 40 s per decoded
    megapixel and 0.2 s per tile."""
    return 40.0 * decoded_pixels / 1e6, 0.2 * tiles


def test_tight_budget_ends_in_time_with_every_id_submitted(pipeline, tmp_path, monkeypatch):
    """A budget that covers half the full cost of the test images, on a simulated clock that each embedded
    image moves on by its simulated cost: stages 05 and 06 end within the budget + 5%, the largest WSIs are
    embedded at lower cost, and the provisional and final submissions list every test id once."""
    from ubc_ocean.inference import stage as stage05
    from ubc_ocean.submit.stage import run as submit

    full_cfg = tiny_config(pipeline, *LEAN)
    specs = competition_specs(full_cfg, TEST)
    images = {s.slide_id: stage05.budget_image(s, full_cfg) for s in specs}
    full_root = layout.test_embeddings_root(full_cfg) / TEST
    full = sum(sum(_simulated_s(images[s.slide_id], images[s.slide_id].pixels,
                                len(embedding_cache.read_embeddings(full_root / f"{s.image_id}.h5")[0])))
               for s in specs)
    budget_minutes = full / 2 / 60
    cfg = _copy_without_test_embeddings(pipeline, tmp_path, f"inference.time_budget_minutes={budget_minutes}",
                                        "inference.budget_min_tiles=4")
    clock = SimulatedClock()
    monkeypatch.setattr(stage05, "clock", clock)
    real_observe = BudgetPlanner.observe

    def observe(self, image, decode_s, decoded_pixels, tiles, encode_s):  # type: ignore[no-untyped-def]
        decode, encode = _simulated_s(image, decoded_pixels, tiles)
        clock.now += decode + encode
        real_observe(self, image, decode, decoded_pixels, tiles, encode)

    monkeypatch.setattr(BudgetPlanner, "observe", observe)
    started = clock()
    stage05.run(cfg)
    provisional = pd.read_csv(layout.submission_path(cfg), dtype={"image_id": str})
    path = submit(cfg)
    assert clock() - started <= budget_minutes * 60 * 1.05
    test_ids = sorted(str(s.image_id) for s in specs)
    for table in (provisional, pd.read_csv(path, dtype={"image_id": str})):
        assert sorted(table.image_id) == test_ids
    test_h5s = (layout.test_embeddings_root(cfg) / TEST).glob("*.h5")
    modes = {p.stem: embedding_cache.read_attrs(p)["inference_mode"] for p in test_h5s}
    assert modes and any(mode != "full" for mode in modes.values())
    failures = pd.read_csv(layout.run_dir(cfg) / "failures_05.csv", dtype={"slide": str})
    unpredicted = set(test_ids) - set(modes)
    assert {s.split("/", 1)[1] for s in failures.slide} == unpredicted
    assert all("time budget" in message for message in failures.message)


def test_stain_augmentation_never_jitters_test_embeddings(pipeline, tmp_path):
    """``features.stain_augmentation`` jitters training tiles (stage 03) only. Stage 05 with it on embeds the
    real test PNGs exactly as with it off, into the folder named without the stain variant; the models
    (trained without it) are not refused, since the jitter is no part of the feature identity; their test
    predictions are the same, and stage 06 takes them."""
    from ubc_ocean.features.embed import embedding_options
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.submit.stage import run as submit

    plain = tiny_config(pipeline, *LEAN)
    cfg = _copy_without_test_embeddings(pipeline, tmp_path, "features.stain_augmentation=0.5")
    assert embedding_options(cfg.features, "train/1")["augment"] is not None  # live for training tiles
    assert layout.embeddings_root(cfg) != layout.test_embeddings_root(cfg)
    assert layout.test_embeddings_root(cfg).name == layout.embeddings_root(plain).name
    infer(cfg)
    originals = sorted((layout.embeddings_root(plain) / TEST).glob("*.h5"))
    assert originals
    for original in originals:
        made = layout.test_embeddings_root(cfg) / TEST / original.name
        features, coords, attrs = embedding_cache.read_embeddings(made)
        want, want_coords, _ = embedding_cache.read_embeddings(original)
        np.testing.assert_array_equal(features, want)
        np.testing.assert_array_equal(coords, want_coords)
        assert attrs["stain_augmentation"] == 0.0
    for name in layout.chosen_models(cfg):
        pd.testing.assert_frame_equal(pd.read_csv(layout.model_dir(cfg, name).predictions(None)),
                                      pd.read_csv(layout.model_dir(plain, name).predictions(None)))
    assert len(pd.read_csv(submit(cfg))) == len(pd.read_csv(Path(cfg.paths.raw) / "test.csv"))


def test_a_budget_too_small_for_any_image_still_leaves_a_complete_submission(pipeline, tmp_path):
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.submit.stage import run as submit

    cfg = _copy_without_test_embeddings(pipeline, tmp_path, "inference.time_budget_minutes=0.000001")
    infer(cfg)
    submission = pd.read_csv(submit(cfg), dtype={"image_id": str})
    test_ids = pd.read_csv(Path(cfg.paths.raw) / "test.csv", dtype={"image_id": str}).image_id
    assert sorted(submission.image_id) == sorted(test_ids) and set(submission.label) == {"Other"}


def test_only_a_run_over_the_whole_test_set_writes_the_provisional_submission(tmp_path):
    from ubc_ocean.inference.stage import writes_provisional

    assert writes_provisional(tiny_config(tmp_path)) and writes_provisional(tiny_config(tmp_path, "runtime.shard=0/1"))
    assert not writes_provisional(tiny_config(tmp_path, "runtime.shard=1/2"))  # it knows only its own images
    assert not writes_provisional(tiny_config(tmp_path, "inference.provisional_submission=false"))


def test_without_the_provisional_submission_stage_05_leaves_the_submission_on_disk(pipeline, tmp_path):
    """``inference.provisional_submission=false`` (the Kaggle runner's later experiments): stage 05 predicts,
    and the submission an earlier experiment left stays as it was, byte for byte."""
    from ubc_ocean.inference.stage import run as infer

    cfg = _copy_without_test_embeddings(pipeline, tmp_path, "inference.provisional_submission=false")
    path = layout.submission_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("image_id,label\nearlier,HGSC\n")
    written = infer(cfg)
    assert path.read_text() == "image_id,label\nearlier,HGSC\n"
    test_ids = pd.read_csv(Path(cfg.paths.raw) / "test.csv", dtype={"image_id": str}).image_id
    assert all(len(pd.read_csv(table)) == len(test_ids) for table in written.values())


@pytest.mark.parametrize("workers", [1, 2])
def test_stage_05_stops_when_every_image_fails_with_the_same_unexpected_error(pipeline, tmp_path, monkeypatch,
                                                                               workers):
    """An encoder that raises on every batch (a bug, a broken install) fails every image with the same
    unexpected error: stage 05 ends with exit status 1, as stages 01 and 03 do, instead of predicting
    nothing and leaving an all-fallback submission; each image still has its failure row. One bad file
    among good ones does not stop it (the hostile-input tests)."""
    from ubc_ocean.cli import main
    from ubc_ocean.inference import pipeline as pipeline_module
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.parallel import AllTasksFailed

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no kernel image is available for execution on the device")
        yield

    monkeypatch.setattr(pipeline_module, "embed_batches", broken)
    cfg = _copy_without_test_embeddings(pipeline, tmp_path, f"inference.decoders={workers}")
    with pytest.raises(AllTasksFailed, match=r"same unexpected RuntimeError .*no kernel image"):
        infer(cfg)
    failures = pd.read_csv(layout.predictions_dir(cfg) / "failures_05.csv")
    test_ids = pd.read_csv(Path(cfg.paths.raw) / "test.csv", dtype={"image_id": str}).image_id
    assert len(failures) == len(test_ids) and failures.message.str.contains("unexpected RuntimeError").all()
    if workers == 1:  # the front door: one error line and exit status 1
        assert main(infer, "stage 05", ["--config", str(layout.predictions_dir(cfg) / "config_05.yaml")]) == 1


@pytest.mark.parametrize(("override", "words"), [
    ("tiling.jpeg_quality=80", ("tile encoding", "'jpg q90' at training", "'jpg q80' now")),
    ("features.input_size=96", ("input size", "64 at training", "96 now")),
])
def test_models_trained_on_other_features_are_refused_naming_both_sides(pipeline, override, words):
    from ubc_ocean.inference.stage import check_feature_identities

    cfg = tiny_config(pipeline, *LEAN, override)
    with pytest.raises(ConfigError) as caught:
        check_feature_identities(cfg, ["abmil"])
    assert all(word in str(caught.value) for word in (*words, "trained on:", "this config:"))
    check_feature_identities(tiny_config(pipeline, *LEAN), ["abmil"])  # the training config passes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="samples the decoders from /proc")
def test_decoder_processes_hold_no_torch(monkeypatch, capsys):
    """bench_decoder_memory's smoke test, and what it measures: stage 05's decoder processes, sampled from
    /proc while they decode, never map torch's library (they import only what decoding needs)."""
    code, out, err = run_script("bench_decoder_memory.py", "--images", "2", "--side", "600",
                                monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT decoder_peak_rss_mb=") and "decoders=2 images=2" in last, last
    assert "decoder_torch=no" in last, out


def test_bench_inference_quick_runs_and_reports(monkeypatch, capsys):
    code, out, err = run_script("bench_inference.py", "--quick", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT tma_s=") and all(k in last for k in ("wsi_s_per_gpx=", "projected_hours=",
                                                                          "gpu_busy=", "overlap=", "device="))



@pytest.mark.slow
def test_bench_bundle_budget_quick_runs_a_two_experiment_bundle_and_reports(tmp_path, monkeypatch, capsys):
    """The smoke test of the bundle's budget benchmark: two experiments trained, bundled and run twice by the
    Kaggle runner (its figures mean nothing at this size: start-up is most of the wall time)."""
    code, out, err = run_script("bench_bundle_budget.py", "--quick", "--work", str(tmp_path / "work"),
                                 monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    # at this size start-up may spend the budget before b: a always runs, b may not
    assert last.startswith("RESULT full_s=") and "ids_ok=True" in last and " ran=a" in last, last


def test_bench_encoder_runs_and_reports(monkeypatch, capsys):
    code, out, err = run_script("bench_encoder.py", "--encoders", "efficientnet_lite0", "--batch-size", "4",
                                 "--reps", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT encoder=efficientnet_lite0 device=cpu step_ms=") and "bucketed_ms=" in last


def _slow_embed_batches(*args, **kwargs):  # type: ignore[no-untyped-def]
    """The encoder, slowed down so that tile batches wait on the queue."""
    from ubc_ocean.features.embed import embed_batches

    time.sleep(0.5)
    yield from embed_batches(*args, **kwargs)


@pytest.mark.long
@pytest.mark.parametrize("late", [False, True], ids=["dies-at-once", "dies-with-its-batch-queued"])
def test_decoder_processes_that_die_fail_their_slides_only_and_the_submission_is_complete(pipeline, tmp_path,
                                                                                          monkeypatch, late):
    """Decoder processes killed mid-slide (SIGKILL after their first batch: the OOM killer, a native crash),
    with that batch still in the process or already waiting on the queue behind a slow encoder, must not
    hang or stop stage 05: each such slide is a failures_05 row saying so, every other slide is predicted,
    and the submission lists every id."""
    from tests import decoder_hooks
    from ubc_ocean.inference import pipeline as pipeline_module
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.submit.stage import run as submit

    cfg = _copy_without_test_embeddings(pipeline, tmp_path, "runtime.workers=2", "inference.queue_depth=2")
    specs = competition_specs(cfg, TEST)
    doomed = [specs[1], specs[3]]
    monkeypatch.setenv(decoder_hooks.DOOMED, ",".join(str(s.image_id) for s in doomed))
    if late:
        monkeypatch.setenv(decoder_hooks.LATE, "1")
        monkeypatch.setattr(pipeline_module, "embed_batches", _slow_embed_batches)
    monkeypatch.setattr(pipeline_module, "decoder_entry", decoder_hooks.decode_or_die)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(infer(cfg)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "stage 05 hung after a decoder process died"
    assert outcome, "stage 05 raised (see the log)"
    failures = pd.read_csv(layout.run_dir(cfg) / "failures_05.csv", dtype={"slide": str})
    assert sorted(failures.slide) == sorted(s.slide_id for s in doomed)
    for message in failures.message:
        assert "decoder process died" in message and any(s.path.name in message for s in doomed)
    predicted = pd.read_csv(outcome[0]["abmil"], dtype={"image_id": str})
    assert sorted(predicted.image_id) == sorted(str(s.image_id) for s in specs if s not in doomed)
    submission = pd.read_csv(submit(cfg), dtype={"image_id": str})
    assert sorted(submission.image_id) == sorted(str(s.image_id) for s in specs)
