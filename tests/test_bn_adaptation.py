"""features.bn_adaptation: batch-norm statistics re-estimated on each side's tiles (AdaBN), and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.builders import LEAN, tiny_config
from ubc_ocean import embedding_cache, layout
from ubc_ocean.config import ConfigError
from ubc_ocean.encoders.registry import Encoder, create_encoder
from ubc_ocean.features.bn_adaptation import (
    STATISTICS_FILE,
    batchnorm_layers,
    batchnorm_state,
    load_batchnorm_state,
    reestimate_batchnorm,
    state_digest,
)
from ubc_ocean.sources import TEST


def tiny_encoder(norm: nn.Module | None = None) -> Encoder:
    """conv -> norm -> pooled features: the batch-norm layer sees the convolution's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm if norm is not None else nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder("tiny", model.eval(), 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4, "none")


def tile_batches(n_batches: int, size: int = 8, side: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, side, side, 3), dtype=np.uint8) for _ in range(n_batches)]


def test_the_statistics_are_the_average_of_the_batch_moments_and_nothing_else_changes() -> None:
    encoder = tiny_encoder()
    batches = tile_batches(3)
    conv, bn = encoder.model[0], encoder.model[1]
    with torch.no_grad():  # the known answer: per channel, the mean over batches of each batch's moments
        outputs = [conv(encoder.preprocess(torch.as_tensor(b))) for b in batches]
    expected_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(0)
    expected_var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outputs]).mean(0)
    parameters = {name: p.detach().clone() for name, p in encoder.model.named_parameters()}
    momentum = bn.momentum

    assert reestimate_batchnorm(encoder, batches, torch.device("cpu")) == 24
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, parameters[name]) for name, p in encoder.model.named_parameters())
    assert not encoder.model.training and not bn.training and bn.momentum == momentum


def test_the_default_encoder_changes_only_its_running_statistics() -> None:
    encoder = create_encoder("efficientnet_lite0", input_size=64)
    before = {key: value.clone() for key, value in encoder.model.state_dict().items()}
    batches = tile_batches(2, size=6, side=64, seed=1)
    with torch.no_grad():
        plain = encoder.model(encoder.preprocess(torch.as_tensor(batches[0])))

    reestimate_batchnorm(encoder, batches, torch.device("cpu"))
    after = encoder.model.state_dict()
    statistics = {key for key in after if key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert changed and changed <= statistics  # parameters, and every other buffer, exactly as they were
    assert {key for key in statistics if key.endswith("running_mean")} <= changed
    with torch.no_grad():
        adapted = encoder.model(encoder.preprocess(torch.as_tensor(batches[0])))
    assert not torch.allclose(plain, adapted)

    fresh = create_encoder("efficientnet_lite0", input_size=64)  # the statistics travel to another copy
    load_batchnorm_state(fresh.model, batchnorm_state(encoder.model))
    assert state_digest(batchnorm_state(fresh.model)) == state_digest(batchnorm_state(encoder.model))


def test_an_encoder_without_batch_norm_is_a_config_error_and_too_few_tiles_change_nothing() -> None:
    with pytest.raises(ConfigError, match="no batch-norm layers"):
        reestimate_batchnorm(tiny_encoder(nn.GroupNorm(1, 4)), tile_batches(1), torch.device("cpu"))
    encoder = tiny_encoder()
    state = batchnorm_state(encoder.model)
    assert reestimate_batchnorm(encoder, [tile_batches(1, size=1)[0]], torch.device("cpu")) == 0
    assert state_digest(batchnorm_state(encoder.model)) == state_digest(state)
    assert len(batchnorm_layers(encoder.model)) == 1


def test_the_sample_is_spread_evenly_over_the_slides(tmp_path: Path) -> None:
    from ubc_ocean import tile_store

    folders = {}
    for slide, count in (("small", 3), ("large", 100), ("middle", 50), ("empty", 0)):
        folder = tmp_path / slide
        folder.mkdir()
        tile_store.write_index(folder, [{"file": f"{i}_0.png", "x": i, "y": 0, "extent": 1, "magnification": 20,
                                         "tissue_fraction": 1, "blur_score": 1} for i in range(count)])
        tile_store.write_slide_info(folder, {}, None)
        folders[slide] = folder
    folders["unfinished"] = tmp_path / "unfinished"  # no index: left out
    picks = tile_store.sample_tiles(folders, 60, seed=0)
    per_slide = {slide: sum(name.startswith(f"{slide}/") for name, _ in picks) for slide in folders}
    assert per_slide["small"] == 3 and per_slide["empty"] == per_slide["unfinished"] == 0
    assert sorted([per_slide["large"], per_slide["middle"]]) == [28, 29]  # the small slide's share goes on
    assert len({name for name, _ in picks}) == 60
    assert picks == tile_store.sample_tiles(folders, 60, seed=0)
    assert picks != tile_store.sample_tiles(folders, 60, seed=1)
    assert len(tile_store.sample_tiles({"a": folders["small"], "b": folders["small"]}, 100, seed=0)) == 6


def test_stages_03_and_05_adapt_to_their_own_tiles(pipeline: Path, tmp_path: Path) -> None:
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.inference.stage import run as infer
    from ubc_ocean.mil.stage import run as train

    data = tmp_path / "data"
    shutil.copytree(pipeline, data, ignore=shutil.ignore_patterns("embeddings"))
    adapted = ("features.bn_adaptation=true", "features.bn_adaptation_tiles=64")
    with pytest.raises(ConfigError, match="batch-norm adaptation"):  # the run's model saw unadapted features
        infer(tiny_config(data, *LEAN, *adapted))

    cfg = tiny_config(data, *LEAN, *adapted, "experiment=adabn")
    root = embed(cfg)
    assert root.name.split("__")[0].endswith("-adabn") and (root / STATISTICS_FILE).exists()
    training = embedding_cache.read_attrs(next(root.glob("train/*.h5")))["bn_statistics_sha256"]
    train(cfg)
    written = infer(cfg)
    test_root = layout.test_embeddings_root(cfg) / TEST
    statistics = test_root / STATISTICS_FILE
    h5 = sorted(test_root.glob("*.h5"))
    assert statistics.exists() and h5
    test_digest = embedding_cache.read_attrs(h5[0])["bn_statistics_sha256"]
    assert test_digest != training  # the test set's own statistics
    assert all(embedding_cache.read_attrs(p)["bn_statistics_sha256"] == test_digest for p in h5)
    stamp = {p: p.stat().st_mtime_ns for p in [statistics, *h5]}
    infer(cfg)  # the same images: statistics and embeddings reused
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert all(path.exists() for path in written.values())


def test_the_statistics_see_the_colour_views_the_embedding_gives_the_encoder() -> None:
    """With stain normalisation (and stain TTA), the tiles are averaged in the views the encoder embeds."""
    batches = tile_batches(2)
    invert = lambda batch: 255 - batch  # noqa: E731  (a stand-in normalisation)
    direct, viewed, both = tiny_encoder(), tiny_encoder(), tiny_encoder()
    reestimate_batchnorm(direct, [invert(b) for b in batches], torch.device("cpu"))
    reestimate_batchnorm(viewed, batches, torch.device("cpu"), {"normalise": invert})
    reestimate_batchnorm(both, [v for b in batches for v in (b, invert(b))], torch.device("cpu"))
    stain_tta = tiny_encoder()
    reestimate_batchnorm(stain_tta, batches, torch.device("cpu"), {"normalise": invert, "stain_tta": True})
    assert state_digest(batchnorm_state(viewed.model)) == state_digest(batchnorm_state(direct.model))
    torch.testing.assert_close(stain_tta.model[1].running_mean, both.model[1].running_mean)
