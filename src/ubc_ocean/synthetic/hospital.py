"""What makes an unseen test hospital's slides differ beyond their stain (issue 26): its scanner's optics and
resolution, its colour response, its section thickness, and a drift of its patients' morphology.

Each :class:`HospitalLook` field is off at its default, and :func:`hospital_look` draws a test hospital's look
from the ``synthetic.test_*`` strengths (0: off) with a stream of its own, so data made with every strength at
0 are byte for byte those made before these effects existed. Stains go through
:mod:`ubc_ocean.synthetic.stain`; the optics and colour here work on the rendered RGB of the tissue only (the
caller keeps the background exact), in a scanner's order: point-spread function, sampling at the scanner's
resolution (resampled back to the nominal one, as stage 01 does to any scanner's slide), colour response,
sharpening, JPEG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from ubc_ocean.synthetic.scanner import defocus, jpeg_round_trip

# The stream of the hospitals' draws (apart from every other draw of stage 00).
HOSPITAL_STREAM = 20261207


@dataclass(frozen=True)
class HospitalLook:
    """One hospital's scanner, colour response, sections and patients (defaults: no effect at all)."""

    resolution: float = 1.0  # >= 1: the scanner samples at this many times the nominal um/px
    psf_sigma: float = 0.0  # Gaussian point-spread function, px at the nominal scale
    sharpen: float = 0.0  # unsharp-mask amount applied by the scanner's software
    jpeg_quality: int = 0  # the scanner's JPEG quality, 1-100 (0: lossless)
    gamma: float = 1.0  # colour response: out = 255 * (in / 255) ** gamma
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gains
    saturation: float = 1.0  # chroma scaled about each pixel's grey level
    thickness: float = 1.0  # section thickness relative to the training hospitals': optical density scale
    nuclear_scale: float = 1.0  # morphology drift: the patients' nuclei are this much larger
    nuclear_density: float = 1.0  # ... and this much denser (a thicker section also overlaps more nuclei)

    @property
    def optics(self) -> bool:
        """Whether any effect on the rendered RGB is on."""
        return (self.resolution != 1.0 or self.psf_sigma > 0 or self.sharpen > 0 or self.jpeg_quality > 0
                or self.gamma != 1.0 or self.white_balance != (1.0, 1.0, 1.0) or self.saturation != 1.0)

    @property
    def nuclei(self) -> tuple[float, float]:
        """(size, density) factors of the nuclei: the morphology drift, with the thickness's overlap."""
        return self.nuclear_scale, self.nuclear_density * self.thickness


def hospital_look(syn: Mapping, hospital: int) -> HospitalLook:
    """The look of test ``hospital`` from the ``synthetic`` section's strengths (each 0 or 1.0: off), drawn
    from the seed and the hospital id only, so every slide of a hospital shares it."""
    rng = np.random.default_rng([int(syn["seed"]), HOSPITAL_STREAM, int(hospital)])
    # always drawn (eight used, one spare), so one effect's value does not depend on another's switch
    draws = rng.standard_normal(9)
    spread = rng.uniform(0.5, 1.0, 3)
    resolution, psf, sharpen = (float(syn[key]) for key in ("test_resolution", "test_psf_sigma", "test_sharpen"))
    colour, thickness, drift = (float(syn[key]) for key in ("test_colour", "test_thickness", "test_morphology_drift"))
    return HospitalLook(
        resolution=1.0 + (resolution - 1.0) * float(spread[0]),
        psf_sigma=psf * float(spread[1]),
        sharpen=sharpen * float(spread[2]),
        jpeg_quality=int(syn["test_scanner_jpeg"]),
        gamma=float(np.exp(0.15 * colour * draws[0])),
        white_balance=tuple(float(np.exp(0.06 * colour * d)) for d in draws[1:4]),  # type: ignore[arg-type]
        saturation=float(np.exp(0.25 * colour * draws[4])),
        thickness=float(np.exp(0.25 * thickness * draws[5])),
        nuclear_scale=float(np.exp(0.12 * drift * draws[6])),
        nuclear_density=float(np.exp(0.2 * drift * draws[7])),
    )


def resample_at(rgb: np.ndarray, resolution: float) -> np.ndarray:
    """``rgb`` as a scanner sampling at ``resolution`` times the nominal um/px sees it, resampled back to the
    nominal grid: area-averaged down, bicubic up (the detail finer than the coarser pixel is gone)."""
    if resolution <= 1.0:
        return rgb
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, round(w / resolution)), max(1, round(h / resolution))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def colour_response(rgb: np.ndarray, gamma: float, gains: tuple[float, float, float],
                    saturation: float) -> np.ndarray:
    """White balance (per-channel gains), gamma, then saturation about each pixel's grey level."""
    x = rgb.astype(np.float32) / 255.0
    x = np.clip(x * np.asarray(gains, np.float32), 0.0, 1.0) ** np.float32(gamma)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * np.float32(saturation)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def unsharp(rgb: np.ndarray, amount: float, sigma: float = 1.0) -> np.ndarray:
    """``rgb + amount * (rgb - blur(rgb))``: a scanner's sharpening."""
    x = rgb.astype(np.float32)
    blurred = ndi.gaussian_filter(x, (sigma, sigma, 0))
    return np.rint(np.clip(x + amount * (x - blurred), 0, 255)).astype(np.uint8)


def apply_scanner(rgb: np.ndarray, tissue: np.ndarray, look: HospitalLook) -> None:
    """The hospital's optics and colour on the tissue of ``rgb``, in place; other pixels keep their value."""
    if not look.optics:
        return
    background = rgb[~tissue].copy()
    out = rgb
    if look.psf_sigma > 0:  # the point-spread function blurs as a defocus does
        out = defocus(out, look.psf_sigma)
    out = resample_at(out, look.resolution)
    if look.gamma != 1.0 or look.white_balance != (1.0, 1.0, 1.0) or look.saturation != 1.0:
        out = colour_response(out, look.gamma, look.white_balance, look.saturation)
    if look.sharpen > 0:
        out = unsharp(out, look.sharpen)
    if look.jpeg_quality > 0:
        out = jpeg_round_trip(out, look.jpeg_quality)
    rgb[:] = out
    rgb[~tissue] = background
