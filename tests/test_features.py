"""The encoder registry, the h5 cache and fused streaming, with the real pretrained default encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from skimage import data

from tests.builders import tiny_config
from ubc_ocean import embedding_cache, layout, tile_store
from ubc_ocean.encoders import WeightsMismatchError, create_encoder
from ubc_ocean.encoders.registry import efficientnet_lite0_imagenet
from ubc_ocean.features.embed import bucket_size, embed_batches
from ubc_ocean.features.stage import embed_tile_folder
from ubc_ocean.inference.fused import embed_slide_streaming
from ubc_ocean.sources import TRAIN, competition_specs
from ubc_ocean.stain_normalisation import StainReference
from ubc_ocean.synthetic import render_slide
from ubc_ocean.tiling.stage import tile_slide

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("efficientnet_lite0", input_size=64)


def test_default_encoder_is_imagenet_pretrained():
    model = efficientnet_lite0_imagenet().eval()
    cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    cat = torch.nn.functional.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        top5 = model((cat - mean) / std).topk(5).indices[0].tolist()
    assert top5[0] in range(281, 286)  # ImageNet's domestic cat classes (tabby, tiger cat, Persian, ...)
    assert sum(i in range(281, 294) for i in top5) >= 3


def test_encoder_data_config_and_identity(encoder):
    assert encoder.out_dim == 1280 and encoder.input_size == 64
    assert encoder.mean == pytest.approx((0.485, 0.456, 0.406))
    other = create_encoder("efficientnet_lite0", input_size=96)
    assert encoder.cache_name != other.cache_name


def test_weights_that_do_not_fit_list_the_keys(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"conv_stem.weight": torch.zeros(8, 3, 3, 3), "not_a_layer.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsMismatchError) as err:
        create_encoder("efficientnet_lite0", weights=path)
    text = str(err.value)
    assert "not_a_layer.weight" in text and "bn1.weight" in text and "conv_stem.weight" in text


def test_unknown_weights_free_model_is_refused():
    with pytest.raises(ValueError, match="needs a weights file"):
        create_encoder("resnet18")


def test_h5_round_trip(tmp_path):
    feats = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    coords = np.arange(10).reshape(5, 2)
    path = tmp_path / "train" / "1.h5"
    embedding_cache.write_embeddings(path, feats, coords, {"encoder": "x", "weights_sha256": None})
    got, got_coords, attrs = embedding_cache.read_embeddings(path)
    assert got.dtype == np.float16 and np.allclose(got, feats, atol=1e-2)
    assert (got_coords == coords).all() and attrs["encoder"] == "x" and "package_version" in attrs
    assert embedding_cache.is_complete(path)
    path.write_bytes(b"truncated")
    assert not embedding_cache.is_complete(path)


def test_bucketed_batches_give_the_same_features_through_power_of_two_shapes(encoder):
    assert [bucket_size(n) for n in (0, 1, 2, 3, 21, 64, 65)] == [1, 1, 2, 4, 32, 64, 128]
    assert [bucket_size(n, full_batch=100) for n in (21, 64, 65, 100, 130)] == [32, 64, 100, 100, 256]
    tiles = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    seen: list[int] = []
    hook = encoder.model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        (plain,) = embed_batches(encoder, [tiles], CPU)  # the CPU's default: no padding (it would cost time)
        (bucketed,) = embed_batches(encoder, [tiles], CPU, tta="flips", bucket=True)
        (flips,) = embed_batches(encoder, [tiles], CPU, tta="flips")
    finally:
        hook.remove()
    assert seen == [5, 8, 8, 8, 5, 5, 5]  # padded to 8 tiles for every TTA view, the padding's rows dropped
    assert plain.shape == bucketed.shape == (5, 1280)
    np.testing.assert_allclose(bucketed, flips, rtol=1e-4, atol=1e-5)
    assert not np.allclose(plain, flips, atol=1e-3)  # the TTA views changed the features: the check has teeth


def test_cached_features_equal_direct_forward_and_fused_mode(tiny_raw, tmp_path, encoder):
    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "tiling.format=png")
    spec = competition_specs(cfg, TRAIN)[0]
    assert tile_slide(spec, cfg).status == "done"
    folder = layout.slide_tiles_dir(cfg, spec.source, spec.image_id)
    features, coords, bad = embed_tile_folder(folder, encoder, cfg, CPU)
    assert not bad and features.shape == (len(tile_store.read_index(folder)), 1280)
    # Two-step features equal a direct forward over the same tile files.
    tiles = np.stack([tile_store.read_tile(folder / name) for name in tile_store.read_index(folder)["file"]])
    direct = np.concatenate(list(embed_batches(encoder, [tiles], CPU)))
    np.testing.assert_allclose(features, direct, rtol=1e-4, atol=1e-4)
    # Fused streaming (no tiles written) gives the same features for the same slide (lossless PNG tiles).
    fused, fused_coords, info = embed_slide_streaming(spec, cfg, encoder, CPU)
    assert (fused_coords == coords).all() and info["n_tiles"] == len(fused)
    np.testing.assert_allclose(fused, features, rtol=1e-3, atol=1e-3)
    # With stain normalisation on, both normalise every tile to the same reference (fitted on these tiles)
    stain = StainReference.fit("macenko", list(tiles), list(tile_store.read_index(folder)["file"]))
    normalising = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", "tiling.format=png",
                              "features.stain_normalisation=macenko")
    stored, _, _ = embed_tile_folder(folder, encoder, normalising, CPU, stain=stain)
    fused_normalised, _, _ = embed_slide_streaming(spec, normalising, encoder, CPU, stain)
    np.testing.assert_allclose(fused_normalised, stored, rtol=1e-3, atol=1e-3)
    assert not np.allclose(stored, features, atol=1e-2)  # the normalisation changed the features
    # When every tile fails the blur filter, fused mode falls back exactly as stage 01 does.
    strict = tiny_config(tmp_path / "strict", f"paths.raw={tiny_raw.paths.raw}", "tiling.format=png",
                         "tiling.min_blur_score=1e9", "tiling.quality_fallback_tiles=3")
    assert tile_slide(spec, strict).status == "done"
    index = tile_store.read_index(layout.slide_tiles_dir(strict, spec.source, spec.image_id))
    few, few_coords, few_info = embed_slide_streaming(spec, strict, encoder, CPU)
    assert len(few) == 3 == len(index) and (few_coords == index[["x", "y"]].to_numpy()).all()
    assert "failed the quality filters" in few_info["fallback"]


def test_cache_folders_keyed_by_encoder_and_tiling(tmp_path, encoder):
    base = tiny_config(tmp_path)
    other_tiling = tiny_config(tmp_path, "tiling.tile_size=96")
    other_mask = tiny_config(tmp_path, "tiling.min_tissue_fraction=0.6")
    roots = {
        layout.embeddings_root(base),
        layout.embeddings_root(other_tiling),
        layout.embeddings_root(other_mask),
        layout.embeddings_root(tiny_config(tmp_path, "features.input_size=96")),
    }
    assert len(roots) == 4
    # runtime-only keys leave the tiling key alone
    assert tile_store.tiling_key(base) == tile_store.tiling_key(tiny_config(tmp_path, "runtime.workers=2"))


def test_stage_03_resumes_and_records_unreadable_tiles(tiny_raw, tmp_path):
    from ubc_ocean.external.stage import run as merge
    from ubc_ocean.features.stage import run as embed
    from ubc_ocean.tiling.stage import run as tile

    cfg = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", f"paths.external={tiny_raw.paths.external}")
    tile(cfg)
    manifest = merge(cfg)
    victim = manifest.iloc[0]
    folder = layout.slide_tiles_dir(cfg, victim.source, victim.image_id)
    broken = folder / tile_store.read_index(folder)["file"][0]
    broken.write_bytes(b"not a jpeg")
    root = embed(cfg)
    files = sorted(root.glob("*/*.h5"))
    assert len(files) == len(manifest)
    features, _, _ = embedding_cache.read_embeddings(layout.embedding_path(root, victim.source, victim.image_id))
    assert len(features) == victim.n_tiles - 1  # the unreadable tile is skipped ...
    failures = pd.read_csv(root / "failures.csv")
    assert broken.name in failures.loc[failures.slide == victim.slide_id, "message"].iloc[0]  # ... and recorded
    stamps = {p: p.stat().st_mtime_ns for p in files}
    embed(cfg)  # complete files are skipped, not rewritten
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # A source's magnification is outside the tiling key: changing it re-tiles and re-embeds that source only.
    sources = [dict(s) for s in cfg.external.sources]
    for source in sources:
        if source["name"] == "synthetic_patches":
            source["magnification"] = 40
    changed = tiny_config(tmp_path, f"paths.raw={tiny_raw.paths.raw}", f"paths.external={tiny_raw.paths.external}",
                          f"external.sources={sources}")
    patches = manifest[manifest.source == "synthetic_patches"]
    counts = tile(changed)
    assert (counts["done"], counts["skipped"], counts["failed"]) == (len(patches), len(manifest) - len(patches), 0)
    info = tile_store.read_slide_info(layout.slide_tiles_dir(changed, "synthetic_patches", patches.image_id.iloc[0]))
    assert info["source_magnification"] == 40.0 and info["extent"] == 2 * changed.tiling.tile_size
    embed(changed)
    rewritten = {p for p in files if p.stat().st_mtime_ns != stamps[p]}
    assert rewritten == {layout.embedding_path(root, "synthetic_patches", i) for i in patches.image_id}


def test_dihedral_tta_makes_features_rotation_invariant(encoder):
    from ubc_ocean.features.augment import tta_views

    tiles = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    assert len(tta_views(torch.zeros(1, 3, 8, 8), "flips")) == 3
    views = tta_views(torch.arange(16.0).view(1, 1, 4, 4), "dihedral")
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    rotated = np.ascontiguousarray(np.rot90(tiles, 1, axes=(1, 2)))
    plain = [np.concatenate(list(embed_batches(encoder, [t], CPU))) for t in (tiles, rotated)]
    tta = [np.concatenate(list(embed_batches(encoder, [t], CPU, tta="dihedral"))) for t in (tiles, rotated)]
    assert not np.allclose(plain[0], plain[1], atol=1e-3)  # the encoder itself is not rotation invariant
    np.testing.assert_allclose(tta[0], tta[1], rtol=1e-4, atol=1e-4)


def test_stain_augmentation_is_seeded_and_keys_the_cache(tmp_path, encoder):
    from ubc_ocean.features.augment import stain_augmenter

    rgb, _ = render_slide("CC", 256, 256, is_tma=True, hospital=0, seed=1)
    batch = np.stack([rgb[:128, :128], rgb[128:, 128:]])
    a = stain_augmenter("train/1", 0.3)(batch)
    b = stain_augmenter("train/1", 0.3)(batch)
    c = stain_augmenter("train/2", 0.3)(batch)
    assert a.shape == batch.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, batch)
    plain = layout.embeddings_root(tiny_config(tmp_path))
    jittered = layout.embeddings_root(tiny_config(tmp_path, "features.stain_augmentation=0.3"))
    averaged = layout.embeddings_root(tiny_config(tmp_path, "features.tta=flips"))
    assert len({plain, jittered, averaged}) == 3


def test_stain_augmentation_without_hestain_is_a_config_error(monkeypatch):
    """albumentations before 2.0.4 (Kaggle's 2024 images have 1.4) has no HEStain: one line, the run's."""
    import albumentations

    from ubc_ocean.config import ConfigError
    from ubc_ocean.features.augment import stain_augmenter

    monkeypatch.delattr(albumentations, "HEStain")
    with pytest.raises(ConfigError, match=r"albumentations >= 2\.0\.4 \(HEStain\).*stain_augmentation=0"):
        stain_augmenter("train/1", 0.3)


def test_fp16_overflow_is_recomputed_in_fp32(monkeypatch, caplog):
    """A layer whose outputs exceed fp16's range: under fp16 autocast the batch comes back finite, equal to
    the fp32 forward, with a warning; batches that fit stay in fp16."""
    import ubc_ocean.device as device_module
    import ubc_ocean.features.embed as embed_module
    from ubc_ocean.encoders.registry import Encoder

    for module in (device_module, embed_module):  # fp16 autocast on CPU, as on a T4
        monkeypatch.setattr(module, "autocast_dtype", lambda device, precision="auto": torch.float16)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    with torch.no_grad():
        model[1].weight.fill_(1.0)  # each output sums its 192 inputs
        model[1].bias.zero_()
    encoder = Encoder("toy", model, 8, (0.0, 0.0, 0.0), (1e-4, 1e-4, 1e-4), 4, "0" * 64)  # inputs up to 1e4
    bright = np.full((2, 8, 8, 3), 255, np.uint8)
    with torch.inference_mode():
        fp32 = model(encoder.preprocess(torch.as_tensor(bright))).numpy()
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(model(encoder.preprocess(torch.as_tensor(bright)))).all()
    assert np.abs(fp32).max() > 65504  # beyond fp16's largest value
    with caplog.at_level("WARNING"):
        (features,) = embed_batches(encoder, [bright], CPU)
    np.testing.assert_allclose(features, fp32, rtol=1e-5)
    assert "overflowed" in caplog.text
    caplog.clear()
    dim = np.full((2, 8, 8, 3), 1, np.uint8)
    (small,) = embed_batches(encoder, [dim], CPU)
    assert np.isfinite(small).all() and "overflowed" not in caplog.text
