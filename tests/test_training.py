"""Training one model on a fold: learning, reproducibility, checkpoints; the ensemble and the Other rule."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

from tests.builders import SMALL_MIL_OPTIONS, class_centre_bags
from ubc_ocean.config import ConfigError, load_config
from ubc_ocean.mil import available_models, default_training
from ubc_ocean.mil.bags import BagError, check_bag, drop_features, sample_instances
from ubc_ocean.mil.checkpoint import load_checkpoint, save_checkpoint
from ubc_ocean.mil.predict import predict_bags
from ubc_ocean.mil.train import class_weights, fit, model_training_config
from ubc_ocean.submit.ensemble import ensemble_weights, label_predictions, weighted_mean

CPU = torch.device("cpu")

# tiny bags: one intra-op thread is fastest, and with torch 2.4 on a busy machine two threads are 5-10x slower
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _mil_cfg(**changes):
    cfg = load_config(None, ["mil.epochs=8", "mil.lr=0.001", "mil.max_instances=16", "mil.feature_dropout=0.0"])
    return {**cfg.mil, **changes}


@pytest.mark.parametrize("model", ["abmil", "transmil"])
def test_fit_learns_and_keeps_best_epoch(model):
    train_bags, train_labels = class_centre_bags(8)
    valid_bags, valid_labels = class_centre_bags(4, seed=1)
    options = {"hidden_dim": 32} if model == "transmil" else {"hidden_dim": 32, "attention_dim": 16}
    result = fit(model, options, train_bags, train_labels, valid_bags, valid_labels, 3, _mil_cfg(), 0, CPU)
    assert result.best_score == pytest.approx(1.0)
    assert result.valid_probs.shape == (12, 3) and np.allclose(result.valid_probs.sum(1), 1, atol=1e-5)
    assert len(result.curves) >= result.best_epoch + 1
    probs = predict_bags(result.model, valid_bags, CPU).probs
    np.testing.assert_allclose(probs, result.valid_probs, atol=1e-6)  # the kept weights are the best epoch's


def test_fit_is_bit_reproducible_on_cpu():
    bags, labels = class_centre_bags(4)
    runs = [fit("abmil", {"hidden_dim": 16, "attention_dim": 8}, bags, labels, bags, labels, 3,
                _mil_cfg(epochs=2, feature_dropout=0.2), 7, CPU) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].valid_probs, runs[1].valid_probs)


def test_mil_bag_standardise_trains_a_model_that_ignores_a_slides_feature_shift_and_keeps_it(tmp_path):
    """mil.bag_standardise reaches the trained model and its checkpoint: validation bags moved as a new
    hospital's scanner might move them (x -> 2x + 5 per feature) are predicted as the originals."""
    train_bags, train_labels = class_centre_bags(8)
    valid_bags, valid_labels = class_centre_bags(4, seed=1)
    moved = [bag * 2.0 + 5.0 for bag in valid_bags]
    result = fit("abmil", {"hidden_dim": 32, "attention_dim": 16}, train_bags, train_labels, moved, valid_labels, 3,
                 _mil_cfg(bag_standardise=True), 0, CPU)
    assert result.model.bag_standardise
    save_checkpoint(tmp_path / "m.pt", result.model, ["A", "B", "C"], {"fold": 0})
    model, _ = load_checkpoint(tmp_path / "m.pt")
    assert model.bag_standardise
    np.testing.assert_allclose(predict_bags(model, valid_bags, CPU).probs, result.valid_probs, atol=1e-4)


def test_checkpoint_rebuilds_the_same_model(tmp_path):
    bags, labels = class_centre_bags(3)
    result = fit("abmil", {"hidden_dim": 16, "attention_dim": 8}, bags, labels, bags, labels, 3,
                 _mil_cfg(epochs=1), 0, CPU)
    save_checkpoint(tmp_path / "m.pt", result.model, ["A", "B", "C"], {"fold": 0})
    model, payload = load_checkpoint(tmp_path / "m.pt")
    assert payload["classes"] == ["A", "B", "C"] and payload["fold"] == 0
    np.testing.assert_allclose(predict_bags(model, bags, CPU).probs, result.valid_probs, atol=1e-6)


def test_class_weights_inverse_frequency():
    weights = class_weights([0, 0, 0, 1], 3)
    assert weights[1] == pytest.approx(3 * weights[0]) and weights[2] == 0


def test_bag_checks_and_subsampling():
    with pytest.raises(BagError, match="empty"):
        check_bag(np.zeros((0, 4)), "s")
    with pytest.raises(BagError, match="NaN"):
        check_bag(np.array([[np.nan, 1.0]]), "s")
    with pytest.raises(BagError, match="width"):
        check_bag(np.zeros((3, 4)), "s", in_dim=5)
    bag = torch.arange(100).view(50, 2)
    sub = sample_instances(bag, 10, torch.Generator().manual_seed(0))
    assert sub.shape == (10, 2) and len(set(sub[:, 0].tolist())) == 10
    # a bag within the cap comes whole, as a new permutation of its rows at every draw
    generator = torch.Generator().manual_seed(0)
    draws = [sample_instances(bag, cap, generator) for cap in (0, 50, 80)]
    for draw in draws:
        assert sorted(draw[:, 0].tolist()) == bag[:, 0].tolist()
        assert torch.equal(draw[:, 1] - draw[:, 0], bag[:, 1] - bag[:, 0])  # rows stay whole
    assert len({tuple(draw[:, 0].tolist()) for draw in [bag, *draws]}) == 4


def test_ensemble_weights_and_alignment():
    assert ensemble_weights({"a": 0.6, "b": 0.9}, "equal") == {"a": 0.5, "b": 0.5}
    assert ensemble_weights({"a": 0.6, "b": 0.9}, "oof")["b"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        ensemble_weights({"a": 1.0}, "median")
    a = pd.DataFrame({"image_id": ["1", "2"], "X": [1.0, 0.0], "Y": [0.0, 1.0]})
    b = pd.DataFrame({"image_id": ["2", "1"], "X": [0.0, 0.0], "Y": [1.0, 1.0]})  # other row order
    mean = weighted_mean({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, "image_id", ["X", "Y"]).set_index("image_id")
    assert mean.loc["1", "X"] == pytest.approx(0.5) and mean.loc["2", "Y"] == pytest.approx(1.0)


def test_ensemble_of_models_with_different_ids_averages_those_that_predicted():
    """Model b lacks image 1 and model a lacks image 3: no row is dropped, none averaged with a hole."""
    a = pd.DataFrame({"image_id": ["1", "2"], "note": ["a1", "a2"], "X": [1.0, 0.0], "Y": [0.0, 1.0]})
    b = pd.DataFrame({"image_id": ["2", "3"], "note": ["b2", "b3"], "X": [0.5, 0.2], "Y": [0.5, 0.8]})
    mean = weighted_mean({"a": a, "b": b}, {"a": 0.75, "b": 0.25}, "image_id", ["X", "Y"]).set_index("image_id")
    assert list(mean.index) == ["1", "2", "3"] and list(mean.note) == ["a1", "a2", "b3"]
    np.testing.assert_allclose(mean[["X", "Y"]].to_numpy(), [[1.0, 0.0], [0.125, 0.875], [0.2, 0.8]])
    holes = b.assign(X=[np.nan, 0.2])  # a model row with a missing value counts as no prediction
    only_a = weighted_mean({"a": a, "b": holes}, {"a": 0.5, "b": 0.5}, "image_id", ["X"]).set_index("image_id")
    assert only_a.loc["2", "X"] == 0.0 and only_a.loc["3", "X"] == pytest.approx(0.2)


def test_best_valid_stops_at_a_perfect_score_or_after_patience_epochs_without_progress():
    """A validation set that the model learns to get all right ends training at the first perfect epoch (no
    later one could be kept); one it never gets right ends it ``patience`` epochs after the best."""
    train_bags, train_labels = class_centre_bags(6)
    valid_bags, valid_labels = class_centre_bags(3, seed=1)
    options = {"hidden_dim": 16, "attention_dim": 8}
    perfect = fit("abmil", options, train_bags, train_labels, valid_bags, valid_labels, 3,
                  _mil_cfg(epochs=40, patience=5), 0, CPU)
    scores = [c["valid_balanced_accuracy"] for c in perfect.curves]
    assert perfect.best_score == scores[-1] == 1.0 and max(scores[:-1]) < 1.0 and len(scores) < 40
    assert perfect.best_epoch == len(scores) - 1
    wrong = [(label + 1) % 3 for label in valid_labels]  # the classes' bags under another class's name
    stale = fit("abmil", options, train_bags, train_labels, valid_bags, wrong, 3, _mil_cfg(epochs=40, patience=3), 0,
                CPU)
    scores = [c["valid_balanced_accuracy"] for c in stale.curves]
    assert max(scores) < 1.0 and len(scores) == stale.best_epoch + 1 + 3 < 40
    assert stale.best_score == max(scores) == scores[stale.best_epoch] >= max(scores[stale.best_epoch + 1 :])


def test_epoch_selection_last_keeps_the_final_epoch():
    train_bags, train_labels = class_centre_bags(6)
    valid_bags, valid_labels = class_centre_bags(3, seed=1)
    options = {"hidden_dim": 16, "attention_dim": 8}
    last = fit("abmil", options, train_bags, train_labels, valid_bags, valid_labels, 3,
               _mil_cfg(epochs=5, patience=1, epoch_selection="last"), 0, CPU)
    assert len(last.curves) == 5 and last.best_epoch == 4  # no early stop, whatever the validation says
    assert last.best_score == pytest.approx(last.curves[-1]["valid_balanced_accuracy"])
    np.testing.assert_allclose(predict_bags(last.model, valid_bags, CPU).probs, last.valid_probs, atol=1e-6)
    with pytest.raises(ConfigError, match="epoch_selection"):
        load_config(None, ["mil.model_training={abmil: {epoch_selection: best}}"])


def test_flagged_rows_become_other():
    probs = np.array([[0.9, 0.1], [0.5, 0.5]])
    labels = label_predictions(probs, np.array([False, True]), ["A", "B"], "Other")
    assert labels.tolist() == ["A", "Other"]


def test_onecycle_balanced_sampling_and_feature_detector():
    train_bags, train_labels = class_centre_bags(6)
    result = fit("abmil", {"hidden_dim": 32, "attention_dim": 16}, train_bags, train_labels,
                 *class_centre_bags(3, seed=2), 3, _mil_cfg(epochs=15, schedule="onecycle", balanced_sampling=True),
                 0, CPU)
    assert result.best_score == pytest.approx(1.0)
    assert result.detector is not None and result.detector.bank.shape == (18, 32)


def test_huge_bag_is_capped_at_prediction():
    from ubc_ocean.mil import create_mil_model
    from ubc_ocean.mil.predict import evenly_spaced

    bag = torch.randn(100_000, 8)
    assert evenly_spaced(bag, 1000).shape == (1000, 8) and torch.equal(evenly_spaced(bag, 1000)[0], bag[0])
    model = create_mil_model("transmil", in_dim=8, n_classes=3, hidden_dim=16)
    outputs = predict_bags(model, [bag], CPU, max_instances=4096)
    assert outputs.probs.shape == (1, 3) and np.isfinite(outputs.logits).all()


def test_leave_one_class_out_auroc_well_above_chance():
    from ubc_ocean.mil.loco import leave_one_class_out

    bags, labels = class_centre_bags(8, n_classes=4, dim=16)
    names = ["A", "B", "C", "D"]
    table = pd.DataFrame({"slide_id": [f"s{i}" for i in range(len(bags))],
                          "label": [names[y] for y in labels],
                          "fold": [i % 2 for i in range(len(bags))]})
    bag_map = dict(zip(table["slide_id"], bags, strict=True))
    result = leave_one_class_out(table, bag_map, ["D"], "abmil", {"hidden_dim": 32, "attention_dim": 16},
                                 _mil_cfg(epochs=10), seed=0, device=CPU)
    aurocs = result.set_index("score")["auroc"]
    assert set(aurocs.index) == {"max_prob", "entropy", "energy", "mahalanobis", "knn"}
    assert (aurocs > 0.5).all() and aurocs["mahalanobis"] > 0.9


def test_bad_bags_are_named_and_left_out(tmp_path):
    from ubc_ocean import embedding_cache
    from ubc_ocean.mil.bags import load_bags

    good = np.ones((4, 8), np.float32)
    nan = good.copy()
    nan[1, 2] = np.nan
    paths = {name: tmp_path / f"{name}.h5" for name in ("good", "nan", "inf", "empty", "missing", "narrow")}
    embedding_cache.write_embeddings(paths["good"], good, np.zeros((4, 2)), {})
    embedding_cache.write_embeddings(paths["nan"], nan, np.zeros((4, 2)), {})
    embedding_cache.write_embeddings(paths["inf"], np.full((2, 8), np.inf, np.float32), np.zeros((2, 2)), {})
    embedding_cache.write_embeddings(paths["empty"], np.zeros((0, 8), np.float32), np.zeros((0, 2)), {})
    embedding_cache.write_embeddings(paths["narrow"], np.ones((3, 5), np.float32), np.zeros((3, 2)), {})
    bags, problems = load_bags(paths, in_dim=8)
    assert list(bags) == ["good"] and bags["good"].dtype == torch.float16
    assert "NaN or inf" in problems["nan"] and "NaN or inf" in problems["inf"]
    assert "empty bag" in problems["empty"] and "no embeddings file" in problems["missing"]
    assert "width 5, expected 8 (the encoder's)" in problems["narrow"]


@pytest.mark.parametrize("model", available_models())
def test_fit_trains_every_registered_head(model):
    train_bags, train_labels = class_centre_bags(8)
    result = fit(model, SMALL_MIL_OPTIONS.get(model, {}), train_bags, train_labels, *class_centre_bags(4, seed=1), 3,
                 _mil_cfg(epochs=12, lr=0.003), 0, CPU)
    assert result.best_score >= 0.9 and result.detector is not None


def test_dual_stream_loss_averages_both_streams():
    from ubc_ocean.mil.train import _loss

    out = {"logits": torch.tensor([[2.0, 0.0, 0.0]]), "aux_logits": torch.tensor([[0.0, 2.0, 0.0]])}
    target, weights = torch.tensor([0]), torch.ones(3)
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * (ce(out["logits"], target) + ce(out["aux_logits"], target))
    assert _loss(out, target, weights).item() == pytest.approx(expected.item())
    assert _loss({"logits": out["logits"]}, target, weights).item() == pytest.approx(ce(out["logits"], target).item())


def test_per_model_training_keys_override_the_mil_section():
    cfg = load_config(None, ["mil.model_training={chowder: {lr: 0.001, epochs: 3}}"])
    chowder = model_training_config(cfg.mil, "chowder")
    assert (chowder["lr"], chowder["epochs"]) == (0.001, 3)
    abmil = model_training_config(cfg.mil, "abmil")
    assert (abmil["lr"], abmil["epochs"]) == (cfg.mil.lr, cfg.mil.epochs)
    with pytest.raises(ConfigError, match=r"mil\.model_training\.chowder\.learning_rate"):  # when it loads
        load_config(None, ["mil.model_training={chowder: {learning_rate: 0.1}}"])
    with pytest.raises(ConfigError, match=r"mil\.model_training\.abmil\.models"):
        load_config(None, ["mil.model_training={abmil: {models: [x]}}"])


def test_a_models_own_defaults_sit_between_the_section_and_model_training(caplog):
    """Precedence, lowest first: the mil section, the model's ``default_training``, then
    ``mil.model_training.<name>``; a section key the user set that a model default overrides is a
    warning naming the key to use; the resolved keys are what checkpoints record."""
    from ubc_ocean.mil.train import check_models, training_record

    own = default_training("chowder")
    assert own and own["lr"] != load_config(None).mil.lr
    assert model_training_config(load_config(None).mil, "chowder")["lr"] == own["lr"]
    assert model_training_config(load_config(None).mil, "abmil")["lr"] == load_config(None).mil.lr
    user = load_config(None, ["mil.lr=0.0005", "mil.models=[abmil,chowder]"]).mil
    assert model_training_config(user, "chowder")["lr"] == own["lr"]
    assert model_training_config(user, "abmil")["lr"] == 0.0005
    with caplog.at_level("WARNING", logger="ubc_ocean.mil.train"):
        check_models(user, in_dim=8, n_classes=3)
    assert "chowder trains with its own default lr=0.002, not mil.lr=0.0005" in caplog.text
    assert "mil.model_training.chowder.lr" in caplog.text and "abmil" not in caplog.text
    chosen = load_config(None, ["mil.lr=0.0005", "mil.model_training.chowder.lr=0.004"]).mil
    assert model_training_config(chosen, "chowder")["lr"] == 0.004
    record = training_record(model_training_config(chosen, "chowder"))
    assert record["lr"] == 0.004 and record["epochs"] == chosen.epochs
    assert not {"models", "model_options", "model_training"} & set(record)


def test_feature_dropout_keeps_the_expected_share_scaled_and_seeded():
    bag = torch.ones(400, 250)
    dropped = drop_features(bag, 0.2, np.random.default_rng(3))
    kept = dropped != 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert torch.allclose(dropped[kept], torch.full((int(kept.sum()),), 1 / 0.8))
    assert torch.equal(dropped, drop_features(bag, 0.2, np.random.default_rng(3)))
    assert not torch.equal(dropped, drop_features(bag, 0.2, np.random.default_rng(4)))
    assert drop_features(bag, 0.0, np.random.default_rng(3)) is bag
    assert not drop_features(bag, 1.0, np.random.default_rng(3)).any()


def test_auto_precision_is_native_bf16_else_fp16(monkeypatch):
    """T4/P100/V100 emulate bf16 slowly: ``auto`` autocasts them to fp16, which training then loss-scales."""
    from ubc_ocean.device import autocast_dtype, grad_scaler

    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no GPU to select
    for native, emulated, auto, bf16 in [(True, True, torch.bfloat16, torch.bfloat16),
                                         (False, True, torch.float16, torch.bfloat16),
                                         (False, False, torch.float16, torch.float16)]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native, e=emulated: n or (including_emulation and e))
        assert autocast_dtype(gpu, "auto") == auto and autocast_dtype(gpu, "bf16") == bf16
        assert autocast_dtype(gpu, "fp16") == torch.float16 and autocast_dtype(gpu, "fp32") is None
    assert autocast_dtype(CPU, "auto") is None and not grad_scaler(CPU, "auto").is_enabled()
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_dtype(CPU, "fp8")


# torch.cuda.get_arch_list() of the CUDA 12.8 builds Kaggle's image ships (no Pascal code), and of an older one
CU128_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def test_gpus_without_kernels_in_the_torch_build_are_never_chosen(monkeypatch, caplog):
    """A P100 (compute 6.0) under a CUDA 12.8 build: ``torch.cuda.is_available()`` is true, and every kernel
    fails. ``auto`` leaves it out (a T4 beside it is used; alone, the CPU), with one warning naming the card
    and the build's architectures; asking for it by name is an error that says why."""
    import ubc_ocean.device as device_module
    from ubc_ocean.device import arch_supported, resolve_device, visible_devices

    assert not arch_supported((6, 0), CU128_ARCHS) and arch_supported((7, 5), CU128_ARCHS)
    assert arch_supported((8, 9), CU128_ARCHS)  # sm_86 machine code runs on 8.9 (same major, lower minor)
    assert arch_supported((13, 0), CU128_ARCHS)  # PTX compute_120 is compiled by the driver for newer GPUs
    assert not arch_supported((9, 1), ["sm_80", "sm_90a"])  # an arch-specific variant runs on exactly 9.0
    assert arch_supported((6, 0), ["sm_50", "sm_60", "compute_50"]) and arch_supported((6, 0), [])
    assert arch_supported((9, 0), ["gfx90a", "gfx942"])  # a ROCm build's list names no CUDA architecture
    cards = {0: ("Tesla P100-PCIE-16GB", (6, 0)), 1: ("Tesla T4", (7, 5))}
    monkeypatch.setattr(device_module, "_warned", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU128_ARCHS)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: cards[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: cards[index][1])
    caplog.set_level("WARNING", logger="ubc_ocean.device")
    assert visible_devices("auto") == [torch.device("cuda", 1)] and resolve_device("auto") == torch.device("cuda", 1)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Tesla P100-PCIE-16GB" in warnings[0] and "6.0" in warnings[0]
    assert "sm_70 sm_75" in warnings[0]
    with pytest.raises(RuntimeError, match="has no kernels in this torch"):
        resolve_device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="only 2 GPUs are visible"):
        resolve_device("cuda:2")
    del cards[1]
    assert visible_devices("auto") == [CPU] and resolve_device("auto") == CPU  # a P100 alone: the CPU


def test_fp16_training_is_loss_scaled_and_still_learns(monkeypatch):
    """The fp16 path (as on a T4) on CPU: autocast to fp16, scaled loss, unscaled clipping, skipped steps."""
    import ubc_ocean.device as device_module

    monkeypatch.setattr(device_module, "autocast_dtype", lambda device, precision="auto": torch.float16)
    scales = []  # the loss scale each time gradients are unscaled for clipping
    real_unscale = torch.amp.GradScaler.unscale_
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_",
                        lambda self, opt: scales.append(self.get_scale() if self.is_enabled() else None)
                        or real_unscale(self, opt))
    bags, labels = class_centre_bags(6)
    result = fit("abmil", {"hidden_dim": 32, "attention_dim": 16}, bags, labels, bags, labels, 3,
                 _mil_cfg(precision="fp16"), 0, CPU)
    assert result.best_score == pytest.approx(1.0)
    assert len(scales) == len(result.curves) * len(bags) and None not in scales
    assert scales[0] == 65536.0  # GradScaler's initial scale: the fp16 loss really was scaled
