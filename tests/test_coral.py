"""CORAL feature alignment: the affine map's known answer, streaming moments, a planted shift it undoes, and
stages 04-05 saving the training tiles' moments and predicting aligned test features."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from tests.builders import LEAN, tiny_config
from ubc_ocean import embedding_cache, layout
from ubc_ocean.config import ConfigError
from ubc_ocean.mil.alignment import (
    CHUNK_ROWS,
    POOLED,
    TMA,
    WSI,
    CoralSettings,
    Moments,
    TileStatistics,
    coral_alignment,
    coral_transform,
)
from ubc_ocean.mil.predict import CheckpointEnsemble
from ubc_ocean.sources import TEST

CPU = torch.device("cpu")


def _gaussian(rng: np.random.Generator, dim: int, n: int, spread: float) -> np.ndarray:
    """``n`` draws of a Gaussian with a random mean and a random full-rank covariance."""
    mean = rng.normal(scale=spread, size=dim)
    factor = (rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim)) * spread
    return rng.multivariate_normal(mean, factor @ factor.T, size=n)


def _moments(features: np.ndarray) -> Moments:
    moments = Moments.empty(features.shape[1])
    moments.add(features)
    return moments


# -------------------------------------------------------------------------------------------- the map


def test_coral_gives_the_target_tiles_the_source_mean_and_covariance():
    """Known answer: target tiles of one 12-dimensional Gaussian mapped onto another's sample moments. As eps
    -> 0 the aligned tiles have the source's mean and covariance to rounding; with eps > 0 the mean is still
    exact and the covariance off by at most ``eps m_s + d ||Cs + eps m_s I||`` (spectral norms), where
    ``m = mean(diag(C))`` and ``d = eps m_t / (min eig(Ct) + eps m_t)``: the aligned covariance is
    ``(Cs + eps m_s I)^{1/2} (I - E) (Cs + eps m_s I)^{1/2}`` with ``0 <= E <= d I``."""
    rng = np.random.default_rng(0)
    source, target = _gaussian(rng, 12, 3000, 2.0), _gaussian(rng, 12, 2000, 0.7)
    source_cov, target_cov = np.cov(source.T), np.cov(target.T)
    assert not np.allclose(source_cov, target_cov, atol=0.1)  # the two distributions differ
    for eps in (0.0, 1e-12):
        matrix, offset = coral_transform(_moments(source), _moments(target), eps)
        aligned = target @ matrix + offset
        np.testing.assert_allclose(aligned.mean(axis=0), source.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(np.cov(aligned.T), source_cov, atol=1e-8 * np.abs(source_cov).max())

    eps = 1e-3
    matrix, offset = coral_transform(_moments(source), _moments(target), eps)
    aligned = target @ matrix + offset
    np.testing.assert_allclose(aligned.mean(axis=0), source.mean(axis=0), atol=1e-9)
    m_s, m_t = np.mean(np.diag(source_cov)), np.mean(np.diag(target_cov))
    d = eps * m_t / (np.linalg.eigvalsh(target_cov).min() + eps * m_t)
    bound = eps * m_s + d * np.linalg.norm(source_cov + eps * m_s * np.eye(12), 2)
    error = np.linalg.norm(np.cov(aligned.T) - source_cov, 2)
    assert 1e-6 < error <= bound < 0.02 * np.linalg.norm(source_cov, 2)


def test_streaming_moments_equal_numpys_over_the_whole_data_and_round_trip(tmp_path):
    """Moments counted in pieces (float16 and float64, one longer than a chunk) equal NumPy's mean and
    covariance of the concatenated rows; per-kind statistics pool, save and load unchanged."""
    rng = np.random.default_rng(1)
    pieces = [rng.normal(3.0, 2.0, size=(n, 8)) for n in (1, 7, CHUNK_ROWS + 5, 40)]
    pieces[1] = pieces[1].astype(np.float16)
    moments = Moments.empty(8)
    for piece in pieces:
        moments.add(piece)
    whole = np.concatenate([p.astype(np.float64) for p in pieces])
    assert moments.count == len(whole)
    np.testing.assert_allclose(moments.mean, whole.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.covariance(), np.cov(whole.T), rtol=1e-9, atol=1e-12)

    statistics = TileStatistics(8)
    for index, piece in enumerate(pieces):
        statistics.add(piece, is_tma=index % 2 == 1)
    assert statistics.counts() == {WSI: 1 + CHUNK_ROWS + 5, TMA: 7 + 40, POOLED: len(whole)}
    np.testing.assert_allclose(statistics.pooled.covariance(), np.cov(whole.T), rtol=1e-9, atol=1e-12)
    loaded = TileStatistics.load(statistics.save(tmp_path / "stats.npz"))
    for kind in (WSI, TMA):
        assert loaded.by_kind[kind].count == statistics.by_kind[kind].count
        assert np.array_equal(loaded.by_kind[kind].outer, statistics.by_kind[kind].outer)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a tile statistics file"):
        TileStatistics.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="at least 2"):
        Moments.empty(8).covariance()


def test_by_kind_aligns_tmas_and_wsis_apart_and_falls_back_to_the_pooled_statistics():
    """With ``by_kind`` each kind of test tile gets its own kind's training mean; a kind with fewer than
    ``min_tiles`` tiles on a side takes that side's pooled statistics; pooled, both kinds share one map."""
    rng = np.random.default_rng(2)
    source, target = TileStatistics(6), TileStatistics(6)
    draws = {}
    for kind, centre in ((WSI, 0.0), (TMA, 5.0)):
        draws["s", kind] = rng.normal(centre, 1.0, size=(600, 6))
        draws["t", kind] = rng.normal(centre + 3.0, 2.0, size=(400, 6))
        source.add(draws["s", kind], kind == TMA)
        target.add(draws["t", kind], kind == TMA)
    apart = coral_alignment(source, target, 1e-3, by_kind=True, min_tiles=100)
    assert apart.sides == {WSI: (WSI, WSI), TMA: (TMA, TMA)}
    for kind in (WSI, TMA):
        aligned = apart.apply(draws["t", kind], is_tma=kind == TMA)
        np.testing.assert_allclose(aligned.mean(axis=0), draws["s", kind].mean(axis=0), atol=1e-4)
    fallback = coral_alignment(source, target, 1e-3, by_kind=True, min_tiles=500)  # the test side has 400
    assert fallback.sides == {WSI: (WSI, POOLED), TMA: (TMA, POOLED)}
    pooled = coral_alignment(source, target, 1e-3)
    assert pooled.sides == {WSI: (POOLED, POOLED), TMA: (POOLED, POOLED)} and pooled.maps[WSI] is pooled.maps[TMA]
    both = np.concatenate([pooled.apply(draws["t", k], k == TMA) for k in (WSI, TMA)])
    np.testing.assert_allclose(both.mean(axis=0), source.pooled.mean, atol=1e-4)


def test_settings_come_back_from_the_record_and_a_bad_record_is_named():
    settings = CoralSettings(1e-3, True, 50)
    record = settings.record("source_statistics.npz", TileStatistics(4))
    assert CoralSettings.from_record(record) == settings and record["tiles"] == {WSI: 0, TMA: 0, POOLED: 0}
    for bad in ({"method": "other"}, {"method": "coral", "eps": 1e-3}, {**record, "eps": 0}):
        with pytest.raises(ValueError, match="feature_alignment"):
            CoralSettings.from_record(bad)


def test_deferred_alignment_reads_each_images_kind_and_predicts_unaligned_without_enough_tiles(tmp_path, caplog):
    """Stage 05's waiting models: each image counted by the kind its h5 records, read back and aligned; with a
    single test tile there is no covariance, and the images are given back unaligned, with a warning."""
    from ubc_ocean.inference.alignment import DeferredAlignment, ModelAlignment

    rng = np.random.default_rng(4)
    source = TileStatistics(4)
    source.add(rng.normal(size=(50, 4)), is_tma=False)
    model = ModelAlignment(CoralSettings(1e-3, False, 2), source)
    bags = {"test/1": rng.normal(5.0, 1.0, size=(1, 4)).astype(np.float16)}
    for slide_id, features in bags.items():
        embedding_cache.write_embeddings(tmp_path / "test" / f"{slide_id[5:]}.h5", features, np.zeros((1, 2)),
                                         {"is_tma": True})
    waiting = DeferredAlignment({"abmil": model}, tmp_path, 4)
    waiting.observe({slide_id: torch.from_numpy(features) for slide_id, features in bags.items()})
    assert waiting.target.counts() == {WSI: 0, TMA: 1, POOLED: 1}
    with caplog.at_level(logging.WARNING):
        ((slide_id, aligned),) = list(waiting.aligned_bags())
    assert slide_id == "test/1" and np.array_equal(aligned["abmil"].numpy(), bags["test/1"])
    assert "predicted unaligned" in caplog.text

    more = rng.normal(5.0, 1.0, size=(30, 4)).astype(np.float16)
    embedding_cache.write_embeddings(tmp_path / "test" / "2.h5", more, np.zeros((30, 2)), {"is_tma": False})
    waiting.observe({"test/2": torch.from_numpy(more)})
    aligned = dict(waiting.aligned_bags())
    expected = model.settings.alignment(source, waiting.target)
    assert np.array_equal(aligned["test/2"]["abmil"].numpy(), expected.apply(more, False))
    every = np.concatenate([aligned[s]["abmil"].numpy() for s in sorted(aligned)])  # the tiles counted
    np.testing.assert_allclose(every.mean(axis=0), source.pooled.mean, atol=1e-5)


# ------------------------------------------------------------------------------------- a planted shift


def _bags(rng: np.random.Generator, centres: np.ndarray, per_class: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags of 30 tiles, a third of them around their class's centre, the rest shared background."""
    bags, labels = [], []
    for label, centre in enumerate(centres):
        for _ in range(per_class):
            tiles = rng.normal(size=(30, centres.shape[1]))
            tiles[:10] += centre
            bags.append(tiles)
            labels.append(label)
    return bags, np.array(labels)


def test_coral_restores_a_classifier_broken_by_a_scanner_like_shift_of_the_features():
    """A nearest-class-mean classifier on bag means, fitted on training bags, labels fresh bags of the same
    distribution well; after a per-feature scale (0.4-2.5) and shift (3-6 units) of every tile, as a new
    hospital's scanner and stain would give, it falls to about chance; CORAL of the shifted test tiles onto
    the training tiles' moments brings it back."""
    rng = np.random.default_rng(3)
    dim, classes = 12, 3
    centres = rng.normal(size=(classes, dim)) * 2.0
    train, train_labels = _bags(rng, centres, 40)
    test, test_labels = _bags(rng, centres, 40)
    scale, shift = rng.uniform(0.4, 2.5, size=dim), rng.uniform(3.0, 6.0, size=dim) * rng.choice([-1, 1], size=dim)
    shifted = [bag * scale + shift for bag in test]
    class_means = np.stack([np.mean([b.mean(axis=0) for b, y in zip(train, train_labels, strict=True) if y == c],
                                    axis=0) for c in range(classes)])

    def accuracy(bags: list[np.ndarray]) -> float:
        means = np.stack([bag.mean(axis=0) for bag in bags])
        predicted = np.linalg.norm(means[:, None] - class_means[None], axis=2).argmin(axis=1)
        return float((predicted == test_labels).mean())

    source, target = TileStatistics(dim), TileStatistics(dim)
    for bag in train:
        source.add(bag, is_tma=False)
    for bag in shifted:
        target.add(bag, is_tma=False)
    alignment = coral_alignment(source, target, 1e-3)
    clean, broken, aligned = accuracy(test), accuracy(shifted), accuracy([alignment.apply(b, False) for b in shifted])
    assert clean >= 0.95 and broken <= 0.4 and aligned >= 0.95, (clean, broken, aligned)


# --------------------------------------------------------------------------------------- stages 04-05


def _test_statistics(cfg, root) -> tuple[TileStatistics, dict[str, np.ndarray], dict[str, bool]]:
    """The moments of every cached test image's tiles, counted here from the h5 files."""
    statistics, features, kinds = None, {}, {}
    for path in sorted((root / TEST).glob("*.h5")):
        values, _, attrs = embedding_cache.read_embeddings(path)
        statistics = statistics or TileStatistics(values.shape[1])
        statistics.add(values, bool(attrs["is_tma"]))
        features[path.stem], kinds[path.stem] = values, bool(attrs["is_tma"])
    assert statistics is not None
    return statistics, features, kinds


def test_stages_save_the_training_moments_and_predict_aligned_test_features(pipeline, tmp_path, caplog,
                                                                             single_torch_thread, monkeypatch):
    """On a copy of the shared tiny pipeline: stage 04 trains ABMIL with CORAL (and mean-pool without, per
    model) and saves the moments of every training tile; stage 05 streams mean-pool's predictions and gives
    ABMIL's, aligned, once every image is in, equal to a hand computation and unlike the same checkpoints
    on raw features; a missing or broken statistics file is refused before anything is embedded."""
    from ubc_ocean.inference.stage import load_alignments
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train
    from ubc_ocean.submit.submission import ProvisionalSubmission

    root = tmp_path / "data"
    shutil.copytree(pipeline, root)
    cfg = tiny_config(root, *LEAN, "experiment=coral", "mil.models=[abmil,meanpool]", "mil.feature_alignment=coral",
                      "mil.coral_eps=0.01", "mil.model_training={meanpool: {feature_alignment: none}}")
    train(cfg)
    model, plain = layout.model_dir(cfg, "abmil"), layout.model_dir(cfg, "meanpool")
    table = layout.read_training_table(cfg)
    expected = TileStatistics.load(model.source_statistics)
    tiles = [embedding_cache.read_embeddings(path)[0].astype(np.float64)
             for path in layout.embedding_paths(layout.embeddings_root(cfg), table).values()]
    whole = np.concatenate(tiles)
    assert expected.counts()[POOLED] == len(whole) and expected.counts()[TMA] > 0
    np.testing.assert_allclose(expected.pooled.mean, whole.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(expected.pooled.covariance(), np.cov(whole.T), rtol=1e-7, atol=1e-9)
    record = model.read_completion()["feature_alignment"]
    assert record == {"method": "coral", "file": "source_statistics.npz", "eps": 0.01, "by_kind": False,
                      "min_tiles": 1000, "tiles": expected.counts()}
    assert model.trained_extras(model.read_completion()) == [model.source_statistics]  # bundled with the model
    assert "feature_alignment" not in plain.read_completion() and not plain.source_statistics.exists()

    arrivals: list[tuple[str, list[str]]] = []
    original = ProvisionalSubmission.add
    monkeypatch.setattr(ProvisionalSubmission, "add", lambda self, new: (
        arrivals.extend((name, list(frame["image_id"])) for name, frame in new.items()), original(self, new))[-1])
    # the stage-05 config's own CORAL keys are ignored: the model applies what it was trained with
    with caplog.at_level(logging.WARNING):
        infer(tiny_config(root, *LEAN, "experiment=coral", "mil.models=[abmil,meanpool]", "mil.coral_eps=0.5"))
    assert "lack some model's prediction" not in caplog.text  # the waiting model is no missing prediction
    test_root = layout.test_embeddings_root(cfg)
    target, features, kinds = _test_statistics(cfg, test_root)
    predictions = model.read_test_predictions().set_index("image_id")
    assert sorted(predictions.index) == sorted(features)
    names = [name for name, _ in arrivals]
    assert names.index("abmil") > max(i for i, name in enumerate(names) if name == "meanpool")  # after streaming
    assert sorted(i for name, ids in arrivals if name == "abmil" for i in ids) == sorted(features)

    alignment = CoralSettings.from_record(record).alignment(expected, target)
    ensemble = CheckpointEnsemble(model.checkpoints(), CPU, "fp32", int(cfg.mil.max_instances_predict))
    classes = list(cfg.data.classes)
    image_id = sorted(features)[0]
    aligned = ensemble.predict([torch.from_numpy(alignment.apply(features[image_id], kinds[image_id]))])
    raw = ensemble.predict([torch.from_numpy(features[image_id])])
    got = predictions.loc[image_id, classes].to_numpy(float)
    np.testing.assert_allclose(got, aligned[classes].to_numpy()[0], atol=1e-5)
    assert not np.allclose(got, raw[classes].to_numpy()[0], atol=1e-3)
    from ubc_ocean.benchmark.runner import read_truth, site_features  # the benchmark's site figure: aligned means

    means, is_test, _ = site_features(cfg, read_truth(cfg))
    expected_means = [alignment.apply(features[i], kinds[i]).mean(axis=0)
                      for i in read_truth(cfg)["image_id"].astype(str) if i in features]  # truth order, embedded
    np.testing.assert_allclose(means[is_test], np.stack(expected_means), rtol=2e-3, atol=2e-3)
    plain_ensemble = CheckpointEnsemble(plain.checkpoints(), CPU, "fp32", int(cfg.mil.max_instances_predict))
    np.testing.assert_allclose(plain.read_test_predictions().set_index("image_id").loc[image_id, classes].to_numpy(
        float), plain_ensemble.predict([torch.from_numpy(features[image_id])])[classes].to_numpy()[0], atol=1e-5)

    sharded = tiny_config(root, *LEAN, "experiment=coral", "runtime.shard=0/2")
    with caplog.at_level(logging.WARNING, logger="ubc_ocean.inference.alignment"):
        waiting = load_alignments(sharded, ["abmil", "meanpool"], test_root, expected.dim)
    assert waiting is not None and list(waiting.models) == ["abmil"]
    assert "shard 0/2" in caplog.text and "this shard's images only" in caplog.text

    uncached = test_root / TEST / f"{image_id}.h5"
    uncached.unlink()  # refused before this image is embedded again
    model.source_statistics.write_bytes(b"broken")
    with pytest.raises(ConfigError, match="trained with feature alignment"):
        infer(cfg)
    model.source_statistics.unlink()
    assert "source_statistics.npz" in str(model.problem())
    with pytest.raises(ConfigError, match=r"source_statistics\.npz"):
        infer(tiny_config(root, *LEAN, "experiment=coral", "inference.models=[abmil]"))
    assert not uncached.exists()
