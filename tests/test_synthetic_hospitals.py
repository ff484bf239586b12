"""Stage 00's unseen test hospitals beyond stain (issue 26): scanner optics and resolution, colour response,
section thickness and morphology drift; each off by default, each checked against what it must do."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from tests.builders import tiny_synthetic_config
from ubc_ocean.config import ConfigError, load_config
from ubc_ocean.synthetic.generate import SlideLook, build_plan, render_slide_layers, slide_look
from ubc_ocean.synthetic.hospital import HospitalLook, apply_scanner, colour_response, hospital_look, resample_at
from ubc_ocean.synthetic.morphology import drift_nuclei

STRENGTHS = ["synthetic.test_resolution=2", "synthetic.test_psf_sigma=1.5", "synthetic.test_sharpen=1",
             "synthetic.test_scanner_jpeg=70", "synthetic.test_colour=1", "synthetic.test_thickness=1",
             "synthetic.test_morphology_drift=1"]


def _sharpness(rgb: np.ndarray, where: np.ndarray) -> float:
    return float(ndi.laplace(rgb.astype(np.float32).mean(axis=2))[where].var())


def test_every_effect_is_off_by_default_so_the_demo_data_stay_as_they_were(tmp_path):
    cfg = tiny_synthetic_config(tmp_path)
    assert hospital_look(cfg.synthetic, 4) == HospitalLook()
    assert not HospitalLook().optics and HospitalLook().nuclei == (1.0, 1.0)
    plan = build_plan(cfg)
    looks = [slide_look(row, cfg.synthetic) for row in plan["test"].itertuples(index=False)]
    assert looks and all(look.hospital == HospitalLook() for look in looks)
    plain = render_slide_layers("HGSC", 240, 200, False, 4, 5)
    same = render_slide_layers("HGSC", 240, 200, False, 4, 5, SlideLook(hospital=HospitalLook()))
    assert all(np.array_equal(a, b) for a, b in zip(plain, same, strict=True))


def test_each_test_hospital_draws_its_own_look_from_the_seed_and_only_test_rows_get_it(tmp_path):
    cfg = tiny_synthetic_config(tmp_path, *STRENGTHS, "synthetic.test_hospitals=2")
    first, second = hospital_look(cfg.synthetic, 4), hospital_look(cfg.synthetic, 7)
    assert first == hospital_look(cfg.synthetic, 4) and first != second  # deterministic, and hospitals differ
    for look in (first, second):
        assert 1.0 < look.resolution <= 2.0 and 0.75 <= look.psf_sigma <= 1.5 and look.jpeg_quality == 70
        assert look.optics and look.thickness != 1.0 and look.nuclei != (1.0, 1.0)
    # one switch moves its own fields only: the others' draws do not depend on it
    colour_only = hospital_look(tiny_synthetic_config(tmp_path, "synthetic.test_colour=1").synthetic, 4)
    assert (colour_only.gamma, colour_only.white_balance, colour_only.saturation) == \
        (first.gamma, first.white_balance, first.saturation)
    assert colour_only.resolution == 1.0 and colour_only.thickness == 1.0 and colour_only.nuclei == (1.0, 1.0)
    plan = build_plan(cfg)
    assert all(slide_look(r, cfg.synthetic).hospital == HospitalLook() for r in plan["train"].itertuples(index=False))
    assert all(slide_look(r, cfg.synthetic).hospital == hospital_look(cfg.synthetic, r.hospital)
               for r in plan["test"].itertuples(index=False))


def test_a_coarser_scanner_loses_the_fine_detail_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    everywhere = np.ones((120, 160), bool)
    assert resample_at(noise, 1.0) is noise
    assert _sharpness(resample_at(noise, 2.0), everywhere) < 0.3 * _sharpness(noise, everywhere)
    flat = np.full((120, 160, 3), 180, np.uint8)
    assert np.array_equal(resample_at(flat, 2.5), flat)  # what has no detail finer than the pixel stays


def test_colour_response_known_answers():
    grey = np.full((2, 2, 3), 128, np.uint8)
    assert (colour_response(grey, 2.0, (1.0, 1.0, 1.0), 1.0) == round(255 * (128 / 255) ** 2)).all()
    assert (colour_response(grey, 1.0, (1.25, 1.0, 0.5), 1.0)[0, 0] == [160, 128, 64]).all()
    tinted = np.array([[[200, 100, 150]]], np.uint8)
    flat = colour_response(tinted, 1.0, (1.0, 1.0, 1.0), 0.0)
    assert (flat == 150).all()  # no saturation: each pixel its grey level


def test_the_scanner_acts_on_the_tissue_only_and_a_psf_blurs_it():
    plain, tissue, _ = render_slide_layers("EC", 300, 240, False, 4, 3)
    inner = ndi.binary_erosion(tissue, iterations=6)
    for look in (HospitalLook(psf_sigma=1.5), HospitalLook(resolution=2.0), HospitalLook(gamma=0.7, sharpen=1.0),
                 HospitalLook(jpeg_quality=40)):
        out = plain.copy()
        apply_scanner(out, tissue, look)
        assert (out[~tissue] == plain[~tissue]).all() and not np.array_equal(out, plain), look
    blurred = plain.copy()
    apply_scanner(blurred, tissue, HospitalLook(psf_sigma=1.5))
    assert _sharpness(blurred, inner) < 0.5 * _sharpness(plain, inner)
    sharpened = plain.copy()
    apply_scanner(sharpened, tissue, HospitalLook(sharpen=1.0))
    assert _sharpness(sharpened, inner) > 1.5 * _sharpness(plain, inner)


def test_a_thicker_section_scales_the_optical_density():
    plain, tissue, _ = render_slide_layers("CC", 240, 200, False, 4, 11)
    thick, _, _ = render_slide_layers("CC", 240, 200, False, 4, 11,
                                      SlideLook(hospital=HospitalLook(thickness=1.3, nuclear_density=1 / 1.3)))
    inner = ndi.binary_erosion(tissue, iterations=4)

    def density(rgb: np.ndarray) -> float:  # mean optical density of the tissue
        return float(-np.log(np.clip(rgb[inner].astype(np.float64), 1, 255) / 255.0).mean())

    assert density(thick) / density(plain) == pytest.approx(1.3, rel=0.08)  # Beer-Lambert, up to rounding


def test_morphology_drift_scales_the_nuclei_and_their_number():
    rng = np.random.default_rng(1)
    n = 400
    spec = (rng.uniform(0, 99, n), rng.uniform(0, 99, n), np.full(n, 4.0), np.full(n, 3.0), rng.uniform(0, 3, n),
            np.full(n, 1.0))
    bigger = drift_nuclei(spec, 1.25, 1.0, rng, (100, 100))
    assert len(bigger[0]) == n and np.allclose(bigger[2], 5.0) and np.allclose(bigger[3], 3.75)
    denser = drift_nuclei(spec, 1.0, 1.5, rng, (100, 100))
    assert len(denser[0]) == 600 and denser[0].max() <= 99 and denser[1].min() >= 0
    sparser = drift_nuclei(spec, 1.0, 0.5, rng, (100, 100))
    assert 150 < len(sparser[0]) < 250
    plain, tissue, _ = render_slide_layers("HGSC", 240, 200, False, 4, 2)
    drifted, _, _ = render_slide_layers("HGSC", 240, 200, False, 4, 2,
                                        SlideLook(hospital=HospitalLook(nuclear_scale=1.3, nuclear_density=1.4)))
    dark = lambda rgb: float((rgb.astype(np.float32).mean(axis=2) < 110)[tissue].mean())  # noqa: E731
    assert dark(drifted) > 1.3 * dark(plain)  # more and larger nuclei: more dark hematoxylin


@pytest.mark.parametrize("override, key", [("synthetic.test_resolution=0.5", "synthetic.test_resolution"),
                                           ("synthetic.test_scanner_jpeg=101", "synthetic.test_scanner_jpeg"),
                                           ("synthetic.test_thickness=-1", "synthetic.test_thickness")])
def test_hospital_keys_are_checked_when_the_config_loads(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/demo.yaml", [override])
