"""Hospital stain model: Beer-Lambert optical density of hematoxylin, eosin and mucin -> RGB.

``RGB = 255 * exp(-(H * h_vec * h_scale + E * e_vec * e_scale + M * m_vec + background_od))``.
Each hospital has its own stain vectors and strengths (a fixed style per index, plus a small seeded
perturbation); each slide adds a smaller jitter of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ubc_ocean.synthetic.morphology import StainMaps

# Typical H&E optical-density directions (R, G, B absorbance), and a pale blue-grey mucin.
HEMATOXYLIN = (0.5626, 0.7201, 0.4062)
EOSIN = (0.2159, 0.8012, 0.5581)
MUCIN = (0.72, 0.58, 0.38)

# Hospital styles by index: (hematoxylin shift, eosin shift, h_scale, e_scale, background OD).
# Index 4 (the default unseen test hospital) is clearly bluer/more purple and lighter than 0-3.
_STYLES: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float, float, float], ...] = (
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0, 1.0, 0.03),  # standard
    ((0.03, -0.02, -0.04), (-0.04, 0.05, -0.08), 0.92, 1.22, 0.04),  # pinker, warm
    ((0.02, 0.03, -0.02), (0.03, 0.0, 0.02), 1.18, 1.08, 0.05),  # darker
    ((-0.02, 0.0, -0.06), (0.0, -0.04, -0.1), 1.06, 0.82, 0.06),  # paler eosin, yellowish glass
    ((0.15, -0.04, -0.16), (0.14, -0.02, -0.1), 0.8, 0.8, 0.02),  # unseen: blue-purple, light
)


def _unit(vec: np.ndarray) -> np.ndarray:
    vec = np.clip(vec, 0.02, None)
    return vec / np.linalg.norm(vec)


@dataclass(frozen=True)
class StainModel:
    """Stain vectors (unit OD directions) and strengths of one hospital (or one slide)."""

    hema: np.ndarray
    eosin: np.ndarray
    mucin: np.ndarray
    h_scale: float
    e_scale: float
    background_od: np.ndarray

    def jittered(self, rng: np.random.Generator, amount: float = 1.0) -> StainModel:
        """A slide-level variant: small random changes of vectors, strengths and glass tint."""
        return replace(
            self,
            hema=_unit(self.hema + rng.normal(0, 0.02 * amount, 3)),
            eosin=_unit(self.eosin + rng.normal(0, 0.025 * amount, 3)),
            h_scale=float(self.h_scale * np.exp(rng.normal(0, 0.05 * amount))),
            e_scale=float(self.e_scale * np.exp(rng.normal(0, 0.06 * amount))),
            background_od=np.clip(self.background_od + rng.normal(0, 0.008 * amount, 3), 0.01, None),
        )

    def to_rgb(self, maps: StainMaps) -> np.ndarray:
        """Beer-Lambert rendering of the concentration maps to uint8 RGB [H, W, 3]."""
        out = np.empty((*maps.hema.shape, 3), np.uint8)
        for c in range(3):
            od = maps.hema * np.float32(self.hema[c] * self.h_scale)
            od += maps.eosin * np.float32(self.eosin[c] * self.e_scale)
            od += maps.mucin * np.float32(self.mucin[c])
            od += np.float32(self.background_od[c])
            np.clip(od, 0.01, 5.0, out=od)
            out[..., c] = np.rint(255.0 * np.exp(-od))
        return out


def hospital_stain(hospital: int, shift: float = 0.0) -> StainModel:
    """The stain model of hospital ``hospital``: a fixed style for 0-4, random styles beyond, plus seeded jitter.

    ``shift`` (>= 0) moves the style further by a seeded random offset of the hospital's own: at 1 the stain
    vectors turn by about as much as the training styles differ from one another, strengths change by ~20%.
    """
    if hospital < 0:
        raise ValueError(f"hospital index must be >= 0, got {hospital}")
    rng = np.random.default_rng([hospital, 7919])
    if hospital < len(_STYLES):
        dh, de, h_scale, e_scale, bg = _STYLES[hospital]
    else:
        dh, de = tuple(rng.normal(0, 0.06, 3)), tuple(rng.normal(0, 0.07, 3))
        h_scale, e_scale, bg = rng.uniform(0.85, 1.2), rng.uniform(0.8, 1.25), rng.uniform(0.02, 0.06)
    if shift > 0:
        extra = np.random.default_rng([hospital, 7919, 1])
        dh = tuple(np.asarray(dh) + extra.normal(0, 0.07 * shift, 3))
        de = tuple(np.asarray(de) + extra.normal(0, 0.08 * shift, 3))
        h_scale *= float(np.exp(extra.normal(0, 0.2 * shift)))
        e_scale *= float(np.exp(extra.normal(0, 0.2 * shift)))
        bg += float(abs(extra.normal(0, 0.03 * shift)))
    model = StainModel(
        hema=_unit(np.asarray(HEMATOXYLIN) + dh),
        eosin=_unit(np.asarray(EOSIN) + de),
        mucin=_unit(np.asarray(MUCIN)),
        h_scale=float(h_scale),
        e_scale=float(e_scale),
        background_od=np.full(3, bg) + np.array([0.0, 0.005, 0.015]),
    )
    return model.jittered(rng, amount=0.5)
