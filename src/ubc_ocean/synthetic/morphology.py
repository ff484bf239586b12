"""Class-specific tissue patterns, drawn as stain-concentration maps (hematoxylin, eosin, mucin).

Everything is vectorised numpy/scipy: smooth noise fields are drawn on a coarse grid and upsampled, glands
and cells are nearest-centre (Voronoi) partitions from one exact distance transform, and nuclei are soft
ellipses stamped in batches. Length scales are in pixels at 20x and multiplied by ``scale`` (2 for 40x TMAs).

Patterns (tumour compartment; shared pink stroma with sparse spindle nuclei everywhere else). A share of
slides is heterogeneous: a minority of their tumour shows another subtype's pattern (``MIXED_*``).

- HGSC: solid sheets with slit-like spaces; dense, large, pleomorphic dark nuclei with nucleoli.
- LGSC: branching papillae (pink cores lined by small uniform nuclei) in pale spaces; psammoma bodies.
- CC: polygonal clear cells with distinct pink-purple borders and round central nuclei.
- EC: back-to-back round/tubular glands with small lumens, stratified elongated (columnar) nuclei.
- MC: large glands filled with pale blue-grey mucin, a thin layer of small basal nuclei, more stroma.
- Other: dense fibrous stroma with streaming elongated spindle nuclei, no glands (unseen in training).
- other_stroma: normal stroma only, no tumour at all (an "Other" kind of the hard benchmark).
- other_near_hgsc: HGSC-like solid sheets with slits, but of smaller, uniform, spindle-shaped nuclei streaming
  in one direction (a sarcoma-like "Other" close to HGSC).

``overlap`` (0-1) makes the classes harder to tell apart: more slides are heterogeneous, their minority
region is larger and of a confusable subtype (``CONFUSABLE``), and tumour nuclei are pulled towards one
common size, shape and darkness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

CLASSES = ("CC", "EC", "HGSC", "LGSC", "MC")
OUTLIER = "Other"
_STAMP_BUDGET = 3_000_000  # window pixels per stamping batch (bounds memory)
MIXED_PROBABILITY = 0.3  # share of (non-Other) slides whose tumour also shows another subtype's pattern ...
MIXED_SHARE = (0.1, 0.3)  # ... over this fraction of the tumour: classes overlap a little
OTHER_STROMA = "other_stroma"
OTHER_NEAR_HGSC = "other_near_hgsc"
# subtypes pathologists confuse with each one (the minority region's pattern when overlap > 0)
CONFUSABLE = {
    "HGSC": ("LGSC", "EC"),
    "LGSC": ("HGSC",),
    "EC": ("HGSC", "CC", "MC"),
    "CC": ("EC",),
    "MC": ("EC",),
}
COMMON_NUCLEUS = (4.4, 3.0, 1.35)  # semi-major, semi-minor (px at 20x), darkness that overlap pulls towards


@dataclass
class StainMaps:
    """Per-pixel stain concentrations (float32, same shape): hematoxylin, eosin, mucin."""

    hema: np.ndarray
    eosin: np.ndarray
    mucin: np.ndarray
    tumour: np.ndarray | None = None  # bool, where the tumour compartment is (set by render_morphology)

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> StainMaps:
        return cls(*(np.zeros(shape, np.float32) for _ in range(3)))

    def paint(self, where: np.ndarray, hema: float, eosin: float, mucin: float = 0.0) -> None:
        """Set the base concentrations of one compartment."""
        self.hema[where] = hema
        self.eosin[where] = eosin
        self.mucin[where] = mucin


@dataclass
class _Ctx:
    rng: np.random.Generator
    shape: tuple[int, int]
    scale: float

    def noise(self, length: float) -> np.ndarray:
        return smooth_noise(self.rng, self.shape, length * self.scale)

    def jitter(self, spread: float = 0.15) -> float:
        """A per-slide multiplier around 1 (density, size)."""
        return float(self.rng.uniform(1 - spread, 1 + spread))


# --------------------------------------------------------------------------------------------- primitives


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], length: float) -> np.ndarray:
    """Gaussian random field of roughly unit variance with features about ``length`` pixels across.

    Drawn on a coarse grid (several samples per feature, so the linear upsampling leaves no kinks).
    """
    h, w = shape
    sigma = 4.0 if length >= 32 else 2.0
    step = max(1, round(length / (2 * sigma)))
    floor = int(8 * sigma)  # wide enough that the wrap-around filter does not flatten a small grid
    low = rng.standard_normal((max(h // step + 4, floor), max(w // step + 4, floor))).astype(np.float32)
    low = ndi.gaussian_filter(low, sigma, mode="wrap")
    low *= np.float32(1 / _filtered_std(sigma))
    if step == 1:
        return np.ascontiguousarray(low[:h, :w])
    return upsample(low, step, h, w)


def _filtered_std(sigma: float) -> float:
    """Standard deviation of unit white noise after scipy's 2-D Gaussian filter of ``sigma``."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    return float((kernel**2).sum())  # separable: sqrt(sum k^2) per axis, squared


def upsample(low: np.ndarray, step: int, h: int, w: int) -> np.ndarray:
    """Separable linear interpolation of a coarse grid (one sample per ``step`` px) to ``h`` x ``w``."""

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(n_out, dtype=np.float32) / np.float32(step)
        i0 = np.minimum(pos.astype(np.int64), n_in - 2)
        return i0, (pos - i0).astype(np.float32)

    i0, f = axis(h, low.shape[0])
    rows = low[i0] * (1 - f)[:, None] + low[i0 + 1] * f[:, None]
    j0, g = axis(w, low.shape[1])
    return rows[:, j0] * (1 - g) + rows[:, j0 + 1] * g


def jittered_grid(
    rng: np.random.Generator, shape: tuple[int, int], spacing: float, jitter: float = 0.45
) -> tuple[np.ndarray, np.ndarray]:
    """Points on a square grid of ``spacing`` px, each moved by up to ``jitter`` spacings (blue-noise-like)."""
    h, w = shape
    gy = np.arange(spacing / 2, h, spacing)
    gx = np.arange(spacing / 2, w, spacing)
    ys, xs = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
    ys = ys + rng.uniform(-jitter, jitter, ys.size) * spacing
    xs = xs + rng.uniform(-jitter, jitter, xs.size) * spacing
    keep = (ys >= 0) & (ys <= h - 1) & (xs >= 0) & (xs <= w - 1)
    return ys[keep], xs[keep]


def lookup(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Values of ``field`` at (rounded, clipped) point positions."""
    iy = np.clip(np.rint(ys).astype(np.int64), 0, field.shape[0] - 1)
    ix = np.clip(np.rint(xs).astype(np.int64), 0, field.shape[1] - 1)
    return field[iy, ix]


def drift_nuclei(spec: tuple[np.ndarray, ...], size: float, density: float, rng: np.random.Generator,
                 shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Nuclei (``ys, xs, semi_major, semi_minor, angle, darkness``) ``size`` times larger and ``density`` times
    as many: a random share kept (< 1), or copies of random nuclei added about one nucleus away (> 1)."""
    ys, xs, major, minor, angle, dark = (np.asarray(x, dtype=np.float32) for x in spec)
    n = ys.size
    if density < 1.0:
        keep = rng.random(n) < density
        ys, xs, major, minor, angle, dark = (x[keep] for x in (ys, xs, major, minor, angle, dark))
    elif density > 1.0 and n:
        pick = rng.integers(n, size=round((density - 1.0) * n))
        step = 2.0 * major[pick]
        new_y = np.clip(ys[pick] + rng.normal(0, 1, pick.size).astype(np.float32) * step, 0, shape[0] - 1)
        new_x = np.clip(xs[pick] + rng.normal(0, 1, pick.size).astype(np.float32) * step, 0, shape[1] - 1)
        ys, xs = np.concatenate([ys, new_y]), np.concatenate([xs, new_x])
        major, minor = np.concatenate([major, major[pick]]), np.concatenate([minor, minor[pick]])
        angle = np.concatenate([angle, rng.uniform(0, np.pi, pick.size).astype(np.float32)])
        dark = np.concatenate([dark, dark[pick]])
    return ys, xs, major * np.float32(size), minor * np.float32(size), angle, dark


def stamp_nuclei(
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    semi_major: np.ndarray,
    semi_minor: np.ndarray,
    angle: np.ndarray,
    darkness: np.ndarray,
) -> None:
    """Max-composite soft elliptical nuclei (slightly darker rim) into ``canvas`` in place.

    ``angle`` is the direction of the major axis in radians, measured from +x towards +y.
    """
    if ys.size == 0:
        return
    h, w = canvas.shape
    flat = canvas.reshape(-1)
    half = np.ceil(semi_major).astype(np.int64) + 2
    for size in np.unique(half):
        chosen = np.flatnonzero(half == size)
        off = np.arange(-size, size + 1)
        batch = max(1, _STAMP_BUDGET // off.size**2)
        for start in range(0, chosen.size, batch):
            idx = chosen[start : start + batch]
            cy, cx = ys[idx][:, None, None], xs[idx][:, None, None]
            iy = np.rint(cy).astype(np.int64) + off[None, :, None]
            ix = np.rint(cx).astype(np.int64) + off[None, None, :]
            dy, dx = (iy - cy).astype(np.float32), (ix - cx).astype(np.float32)
            cos, sin = np.cos(angle[idx])[:, None, None], np.sin(angle[idx])[:, None, None]
            a, b = semi_major[idx][:, None, None], semi_minor[idx][:, None, None]
            u = (dx * cos + dy * sin) / a
            v = (dy * cos - dx * sin) / b
            r2 = u * u + v * v
            edge = np.clip((1.0 - np.sqrt(r2)) * (0.6 * (a + b)), 0.0, 1.0)
            val = darkness[idx][:, None, None] * edge * (0.8 + 0.3 * r2)
            ok = (val > 0) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            np.maximum.at(flat, (iy * w + ix)[ok], val[ok].astype(np.float32))


def _stamp_psammoma(maps: StainMaps, ctx: _Ctx, ys: np.ndarray, xs: np.ndarray, radii: np.ndarray) -> None:
    """Round concentric laminated calcifications (purple rings)."""
    h, w = ctx.shape
    for cy, cx, rad in zip(ys, xs, radii, strict=True):
        y0, y1 = max(0, int(cy - rad - 2)), min(h, int(cy + rad + 3))
        x0, x1 = max(0, int(cx - rad - 2)), min(w, int(cx + rad + 3))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2).astype(np.float32)
        inside = np.clip((rad - r) * 0.8, 0.0, 1.0)
        period = 3.4 * ctx.scale
        rings = 0.3 + 0.7 * np.cos(np.pi * r / period) ** 2 + 0.2 * (r / rad)
        sl = (slice(y0, y1), slice(x0, x1))
        maps.hema[sl] = maps.hema[sl] * (1 - inside) + inside * 1.5 * rings
        maps.eosin[sl] = maps.eosin[sl] * (1 - inside) + inside * 0.35
        maps.mucin[sl] *= 1 - inside


def nearest_centre_field(
    shape: tuple[int, int],
    ys: np.ndarray,
    xs: np.ndarray,
    semi_a: np.ndarray,
    semi_b: np.ndarray,
    angle: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voronoi partition of the centres and, per pixel, the elliptical radius within its own cell.

    Returns (rho, label, border): rho = 1 on the ellipse (semi-axes ``semi_a`` along ``angle``,
    ``semi_b`` across), label = index of the nearest centre, border = pixels where the label changes.
    """
    h, w = shape
    iy = np.clip(np.rint(ys).astype(np.int64), 0, h - 1)
    ix = np.clip(np.rint(xs).astype(np.int64), 0, w - 1)
    seeds = np.ones(shape, bool)
    seeds[iy, ix] = False
    owner = np.full(shape, -1, np.int64)
    owner[iy, ix] = np.arange(iy.size)
    near = ndi.distance_transform_edt(seeds, return_distances=False, return_indices=True)
    label = owner[near[0], near[1]]
    dy = (np.arange(h, dtype=np.float32)[:, None] - ys[label]).astype(np.float32)
    dx = (np.arange(w, dtype=np.float32)[None, :] - xs[label]).astype(np.float32)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    u = (dx * cos[label] + dy * sin[label]) / semi_a[label].astype(np.float32)
    v = (dy * cos[label] - dx * sin[label]) / semi_b[label].astype(np.float32)
    rho = np.sqrt(u * u + v * v)
    border = np.zeros(shape, bool)
    border[:-1] |= label[:-1] != label[1:]
    border[1:] |= label[:-1] != label[1:]
    border[:, :-1] |= label[:, :-1] != label[:, 1:]
    border[:, 1:] |= label[:, :-1] != label[:, 1:]
    return rho, label, border


def _flow(ctx: _Ctx, waviness: float) -> np.ndarray:
    """Stream function: its level sets are wavy parallel fibres in one slide-wide direction."""
    h, w = ctx.shape
    theta = ctx.rng.uniform(0, np.pi)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    across = -xx * np.float32(np.sin(theta)) + yy * np.float32(np.cos(theta))
    return across + np.float32(waviness * ctx.scale) * ctx.noise(120)


def _flow_angle(psi: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Direction along the fibres (perpendicular to grad psi) at the points."""
    h, w = psi.shape
    iy = np.clip(np.rint(ys).astype(np.int64), 1, h - 2)
    ix = np.clip(np.rint(xs).astype(np.int64), 1, w - 2)
    gy = psi[iy + 1, ix] - psi[iy - 1, ix]
    gx = psi[iy, ix + 1] - psi[iy, ix - 1]
    return np.arctan2(gx, -gy)


def _ellipse_points(
    cy: np.ndarray, cx: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray, rho: np.ndarray, phi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points at elliptical radius ``rho`` and parameter ``phi`` on each gland, with the outward normal."""
    u, v = a * rho * np.cos(phi), b * rho * np.sin(phi)
    cos, sin = np.cos(theta), np.sin(theta)
    xs = cx + u * cos - v * sin
    ys = cy + u * sin + v * cos
    normal = np.arctan2(a * np.sin(phi), b * np.cos(phi)) + theta
    return ys, xs, normal


# ------------------------------------------------------------------------------------------------ stroma


def _stroma(ctx: _Ctx, maps: StainMaps, psi: np.ndarray) -> None:
    """Shared pink fibrous stroma with sparse spindle nuclei and a few lymphocytes."""
    period = 7.0 * ctx.scale
    fibres = 0.5 + 0.5 * np.sin(psi * np.float32(2 * np.pi / period) + 2.0 * ctx.noise(12))
    maps.eosin[:] = (0.5 + 0.14 * fibres) * ctx.jitter(0.1)
    maps.hema[:] = 0.05
    maps.mucin[:] = 0.0


def _stroma_nuclei(ctx: _Ctx, where: np.ndarray, psi: np.ndarray, density: float = 1.0) -> tuple[np.ndarray, ...]:
    s, rng = ctx.scale, ctx.rng
    ys, xs = jittered_grid(rng, ctx.shape, 24 * s / np.sqrt(density))
    keep = lookup(where, ys, xs) & (rng.random(ys.size) < 0.6)
    ys, xs = ys[keep], xs[keep]
    n = ys.size
    lympho = rng.random(n) < 0.15
    a = np.where(lympho, 2.6, rng.uniform(5.0, 7.5, n)) * s
    b = np.where(lympho, 2.4, rng.uniform(1.5, 2.1, n)) * s
    angle = _flow_angle(psi, ys, xs) + rng.normal(0, 0.2, n)
    dark = np.where(lympho, rng.uniform(1.6, 1.9, n), rng.uniform(0.9, 1.25, n))
    return ys, xs, a, b, angle, dark


# ------------------------------------------------------------------------------------------------ classes


def _hgsc(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    s, rng = ctx.scale, ctx.rng
    slit_field = ctx.noise(40)
    slits = tumour & (np.abs(slit_field) < 0.07 * ctx.jitter(0.3)) & (ctx.noise(90) > -0.2)
    sheet = tumour & ~slits
    maps.paint(sheet, 0.2, 0.42)
    maps.paint(slits, 0.02, 0.06)
    size = 5.4 * ctx.jitter(0.1)
    ys, xs = jittered_grid(rng, ctx.shape, 11.5 * s * ctx.jitter(0.1), jitter=0.4)
    keep = lookup(sheet, ys, xs)
    ys, xs = ys[keep], xs[keep]
    n = ys.size
    a = np.clip(rng.lognormal(np.log(size), 0.22, n), 3.5, 10.0)
    giant = rng.random(n) < 0.04
    a = np.where(giant, rng.uniform(9.0, 13.0, n), a) * s
    b = a * rng.uniform(0.55, 1.0, n)
    angle = rng.uniform(0, np.pi, n)
    dark = rng.uniform(1.15, 1.85, n) + 0.3 * giant
    nucleoli = rng.random(n) < 0.4
    ny, nx = ys[nucleoli] + rng.normal(0, 0.8, nucleoli.sum()), xs[nucleoli] + rng.normal(0, 0.8, nucleoli.sum())
    k = ny.size
    return [
        (ys, xs, a, b, angle, dark),
        (ny, nx, np.full(k, 1.5 * s), np.full(k, 1.3 * s), np.zeros(k), np.full(k, 2.6)),
    ]


def _signed_distance(field: np.ndarray, level: float) -> np.ndarray:
    """Approximate signed distance in px to the ``level`` set of a smooth field (positive above it)."""
    gy, gx = np.gradient(field)
    return (field - np.float32(level)) / (np.sqrt(gy * gy + gx * gx) + np.float32(1e-3))


def _lgsc(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    s, rng = ctx.scale, ctx.rng
    # papillae: branching ridges (zero set of one field, width varying so fingers taper and end) and
    # islands (papillae cut across), each a fibrovascular core lined by a band of epithelium
    ridge = ctx.noise(55)
    width = 13.0 * s * ctx.jitter(0.2) * np.clip(0.8 + 0.6 * ctx.noise(120), 0.0, None)
    gy, gx = np.gradient(ridge)
    to_axis = np.abs(ridge) / (np.sqrt(gy * gy + gx * gx) + np.float32(1e-3))
    depth = np.maximum(width - to_axis, _signed_distance(ctx.noise(45), 0.8 * ctx.jitter(0.15)))
    epi_w = 6.0 * s * ctx.jitter(0.1)
    core = tumour & (depth > epi_w)
    epi = tumour & ~core & (depth > 0)
    space = tumour & (depth <= 0)
    maps.paint(core, 0.07, 0.42)
    maps.paint(epi, 0.15, 0.36)
    maps.paint(space, 0.02, 0.13)
    ys, xs = jittered_grid(rng, ctx.shape, 6.0 * s, jitter=0.3)
    keep = lookup(epi, ys, xs)
    ys, xs = ys[keep], xs[keep]
    n = ys.size
    a = rng.uniform(2.9, 3.4, n) * s * ctx.jitter(0.05)
    nuclei = (ys, xs, a, a * rng.uniform(0.8, 1.0, n), rng.uniform(0, np.pi, n), rng.uniform(1.0, 1.2, n))
    # psammoma bodies, mostly in the cores
    h, w = ctx.shape
    count = rng.poisson(max(0.5, h * w / (260.0 * s) ** 2 * ctx.jitter(0.5)))
    py, px = rng.uniform(0, h, 8 * count + 8), rng.uniform(0, w, 8 * count + 8)
    inside = lookup(core, py, px)
    py, px = py[inside][:count], px[inside][:count]
    _stamp_psammoma(maps, ctx, py, px, rng.uniform(8.0, 17.0, py.size) * s)
    return [nuclei]


def _cc(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    s, rng = ctx.scale, ctx.rng
    ys, xs = jittered_grid(rng, ctx.shape, 17.0 * s * ctx.jitter(0.12), jitter=0.38)
    n = ys.size
    ones = np.ones(n)
    _, label, border = nearest_centre_field(ctx.shape, ys, xs, ones, ones, np.zeros(n))
    membrane = ndi.gaussian_filter(border.astype(np.float32), 0.55 * s)
    membrane = np.clip(membrane * 1.6, 0.0, 1.0)
    septa = np.abs(ctx.noise(140)) < 0.035  # thin fibrovascular septa between nests
    cells = tumour & ~septa
    pale = rng.uniform(0.02, 0.12, n).astype(np.float32)  # some cells faintly eosinophilic
    maps.hema[cells] = 0.025 + 0.24 * membrane[cells]
    maps.eosin[cells] = pale[label[cells]] + 0.5 * membrane[cells]
    maps.mucin[cells] = 0.0
    keep = lookup(cells, ys, xs)
    ys, xs = ys[keep], xs[keep]
    n = ys.size
    a = rng.uniform(3.4, 4.6, n) * s * ctx.jitter(0.08)
    ys = ys + rng.normal(0, 0.8 * s, n)
    xs = xs + rng.normal(0, 0.8 * s, n)
    return [(ys, xs, a, a * rng.uniform(0.85, 1.0, n), rng.uniform(0, np.pi, n), rng.uniform(1.25, 1.6, n))]


def _glands(
    ctx: _Ctx, radius: float, aspect: tuple[float, float], spacing: float, drop: float
) -> tuple[np.ndarray, ...]:
    """Gland centres and ellipse parameters on a jittered grid; ``drop`` of them are left out (stroma)."""
    rng = ctx.rng
    ys, xs = jittered_grid(rng, ctx.shape, spacing, jitter=0.28)
    n = ys.size
    r = radius * rng.uniform(0.75, 1.25, n)
    asp = rng.uniform(*aspect, n)
    a, b = r * np.sqrt(asp), r / np.sqrt(asp)
    theta = rng.uniform(0, np.pi, n)
    present = rng.random(n) >= drop
    return ys, xs, a, b, theta, present


def _ec(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    s, rng = ctx.scale, ctx.rng
    radius = 27.0 * s * ctx.jitter(0.15)
    gy, gx, a, b, theta, present = _glands(ctx, radius, (1.0, 2.0), 1.6 * radius, drop=0.04)
    rho, label, border = nearest_centre_field(ctx.shape, gy, gx, a, b, theta)
    lumen_r = rng.uniform(0.2, 0.34, gy.size).astype(np.float32)
    own = present[label] & tumour & ~border
    lumen = own & (rho < lumen_r[label])
    epi = own & ~lumen & (rho < 1.0)
    maps.paint(epi, 0.32, 0.46)
    maps.paint(lumen, 0.015, 0.08)
    # columnar nuclei in a palisade (one full, one partial layer), long axis along the gland's radius
    per = np.maximum(8, (2 * np.pi * np.sqrt(a * b) * 0.7 / (4.4 * s)).astype(np.int64))
    idx = np.repeat(np.flatnonzero(present), per[present])
    slot = np.arange(idx.size) - np.repeat(np.cumsum(per[present]) - per[present], per[present])
    second = rng.random(idx.size) < 0.9
    idx = np.concatenate([idx, idx[second]])
    slot = np.concatenate([slot, slot[second] + 0.5])
    k = idx.size
    phi = (slot + rng.uniform(-0.2, 0.2, k)) * 2 * np.pi / per[idx]
    layer = np.concatenate([np.full(k - second.sum(), 0.0), np.ones(second.sum())])
    rr = 0.5 * (lumen_r[idx] + 1.0) + (0.16 * layer - 0.06) + rng.normal(0, 0.04, k)
    ys, xs, normal = _ellipse_points(gy[idx], gx[idx], a[idx], b[idx], theta[idx], rr, phi)
    inside = (ys >= 0) & (ys <= ctx.shape[0] - 1) & (xs >= 0) & (xs <= ctx.shape[1] - 1)
    inside &= (lookup(label, ys, xs) == idx) & lookup(epi, ys, xs)
    ys, xs, normal = ys[inside], xs[inside], normal[inside]
    k = ys.size
    major = rng.uniform(4.6, 6.2, k) * s
    return [(ys, xs, major, rng.uniform(1.8, 2.3, k) * s, normal + rng.normal(0, 0.12, k), rng.uniform(1.2, 1.6, k))]


def _mc(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    s, rng = ctx.scale, ctx.rng
    radius = 38.0 * s * ctx.jitter(0.15)
    gy, gx, a, b, theta, present = _glands(ctx, radius, (1.0, 1.6), 2.35 * radius, drop=0.1)
    rho, label, _ = nearest_centre_field(ctx.shape, gy, gx, a, b, theta)
    own = present[label] & tumour
    mucin = own & (rho < 0.87)
    epi = own & ~mucin & (rho < 1.0)
    wisps = np.clip(0.5 + 0.35 * ctx.noise(14), 0.0, 1.0)
    maps.hema[mucin] = 0.05 + 0.04 * wisps[mucin]
    maps.eosin[mucin] = 0.03
    maps.mucin[mucin] = 0.22 + 0.35 * wisps[mucin]
    maps.paint(epi, 0.08, 0.3, 0.15)
    per = np.maximum(10, (2 * np.pi * np.sqrt(a * b) / (5.5 * s)).astype(np.int64))
    idx = np.repeat(np.flatnonzero(present), per[present])
    k = idx.size
    phi = rng.uniform(0, 2 * np.pi, k)
    ys, xs, normal = _ellipse_points(gy[idx], gx[idx], a[idx], b[idx], theta[idx], rng.uniform(0.935, 0.955, k), phi)
    inside = (ys >= 0) & (ys <= ctx.shape[0] - 1) & (xs >= 0) & (xs <= ctx.shape[1] - 1)
    inside &= (lookup(label, ys, xs) == idx) & lookup(own, ys, xs)
    ys, xs, normal = ys[inside], xs[inside], normal[inside]
    k = ys.size
    return [(ys, xs, rng.uniform(2.8, 3.4, k) * s, rng.uniform(2.0, 2.4, k) * s, normal, rng.uniform(1.05, 1.3, k))]


def _spindle_nuclei(
    ctx: _Ctx, psi: np.ndarray, where: np.ndarray, spacing: float, grid_jitter: float, angle_sd: float,
    long_axis: tuple[float, float], short_axis: tuple[float, float], darkness: tuple[float, float],
) -> tuple[np.ndarray, ...]:
    """Elongated nuclei on a jittered grid (``spacing`` px at scale 1) inside ``where``, aligned with the fibre
    flow ``psi`` give or take ``angle_sd`` radians; axes (px at scale 1) and darkness drawn uniformly."""
    s, rng = ctx.scale, ctx.rng
    ys, xs = jittered_grid(rng, ctx.shape, spacing * s * ctx.jitter(0.1), jitter=grid_jitter)
    keep = lookup(where, ys, xs)
    ys, xs = ys[keep], xs[keep]
    n = ys.size
    angle = _flow_angle(psi, ys, xs) + rng.normal(0, angle_sd, n)
    a = rng.uniform(*long_axis, n) * s
    return ys, xs, a, rng.uniform(*short_axis, n) * s, angle, rng.uniform(*darkness, n)


def _other(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    period = 5.0 * ctx.scale
    fibres = 0.5 + 0.5 * np.sin(psi * np.float32(2 * np.pi / period) + 0.6 * ctx.noise(16))
    maps.eosin[tumour] = 0.62 + 0.22 * fibres[tumour]
    maps.hema[tumour] = 0.07
    maps.mucin[tumour] = 0.0
    return [_spindle_nuclei(ctx, psi, tumour, 9.5, 0.45, 0.12, (7.0, 10.5), (1.7, 2.4), (1.15, 1.5))]


def _near_hgsc(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """HGSC's sheets and slits, but small uniform spindle nuclei aligned with the fibres (sarcoma-like)."""
    slits = tumour & (np.abs(ctx.noise(40)) < 0.07 * ctx.jitter(0.3)) & (ctx.noise(90) > -0.2)
    sheet = tumour & ~slits
    maps.paint(sheet, 0.16, 0.5)
    maps.paint(slits, 0.02, 0.06)
    return [_spindle_nuclei(ctx, psi, sheet, 10.0, 0.4, 0.25, (5.0, 6.5), (1.8, 2.3), (1.3, 1.6))]


def _no_tumour(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    return []


_Renderer = Callable[[_Ctx, StainMaps, np.ndarray, np.ndarray], list[tuple[np.ndarray, ...]]]
PATTERNS: dict[str, tuple[_Renderer, float]] = {  # renderer, fraction of the tissue that is tumour
    "HGSC": (_hgsc, 0.8),
    "LGSC": (_lgsc, 0.8),
    "CC": (_cc, 0.75),
    "EC": (_ec, 0.8),
    "MC": (_mc, 0.7),
    OUTLIER: (_other, 0.85),
    OTHER_NEAR_HGSC: (_near_hgsc, 0.8),
    OTHER_STROMA: (_no_tumour, 0.0),
}


def _pull_nuclei(spec: tuple[np.ndarray, ...], amount: float, scale: float) -> tuple[np.ndarray, ...]:
    """Move nuclear size, shape and darkness ``amount`` (0-1) of the way to ``COMMON_NUCLEUS``."""
    if amount <= 0:
        return spec
    ys, xs, a, b, angle, dark = spec
    major, minor, darkness = COMMON_NUCLEUS
    a2 = a + amount * (major * scale - a)
    b2 = np.minimum(b + amount * (minor * scale - b), a2)
    return ys, xs, a2, b2, angle, dark + amount * (darkness - dark)


def _tumour_renderer(renderer: _Renderer, overlap: float) -> _Renderer:
    """``renderer`` whose main nuclei are pulled towards the common nucleus by ``overlap``."""
    if overlap <= 0:
        return renderer

    def pulled(ctx: _Ctx, maps: StainMaps, tumour: np.ndarray, psi: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        specs = renderer(ctx, maps, tumour, psi)
        return [_pull_nuclei(specs[0], overlap, ctx.scale), *specs[1:]] if specs else specs

    return pulled


def render_morphology(
    label: str,
    shape: tuple[int, int],
    scale: float,
    rng: np.random.Generator,
    tissue: np.ndarray | None = None,
    tumour_share: float | None = None,
    overlap: float = 0.0,
    nuclei_drift: tuple[float, float] = (1.0, 1.0),
) -> StainMaps:
    """Concentration maps of a region of ``shape`` showing ``label``'s pattern at ``scale``.

    ``tissue`` (optional mask) is where the slide has tissue: the tumour share is measured there.
    ``tumour_share`` (0-1) replaces the pattern's own (about 0.7-0.85; the rest is stroma); ``overlap``
    (0-1) makes the classes look alike (module docstring). ``nuclei_drift`` (size, density) scales every
    nucleus and their number: a test hospital's patients (:mod:`ubc_ocean.synthetic.hospital`); (1, 1) draws
    nothing more. The tumour map is returned in ``maps.tumour``.
    """
    if label not in PATTERNS:
        raise ValueError(f"unknown synthetic class {label!r}; expected one of {sorted(PATTERNS)}")
    renderer, tumour_fraction = PATTERNS[label]
    ctx = _Ctx(rng=rng, shape=shape, scale=scale)
    maps = StainMaps.empty(shape)
    psi = _flow(ctx, waviness=rng.uniform(20, 45))
    _stroma(ctx, maps, psi)
    fraction = np.clip(tumour_fraction + rng.normal(0, 0.05), 0.5, 0.95)
    if tumour_share is not None:
        fraction = float(np.clip(tumour_share, 0.0, 1.0))
    region = ctx.noise(170)
    inside = region[::4, ::4] if tissue is None else region[::4, ::4][tissue[::4, ::4]]
    tumour = region > (np.quantile(inside, 1 - fraction) if inside.size else 0.0)
    if label == OTHER_STROMA:
        tumour[:] = False
    nuclei = []
    mixed_probability = MIXED_PROBABILITY + (1 - MIXED_PROBABILITY) * overlap
    if label in CLASSES and rng.random() < mixed_probability:
        # heterogeneous tumour: a minority region shows another subtype's pattern
        partners = CONFUSABLE[label] if overlap > 0 else [c for c in CLASSES if c != label]
        other = str(rng.choice(partners))
        patch = ctx.noise(200)
        low, high = MIXED_SHARE
        share = rng.uniform(low + 0.2 * overlap, high + 0.15 * overlap)
        candidates = patch[::4, ::4][tumour[::4, ::4]]
        minority = tumour & (patch > (np.quantile(candidates, 1 - share) if candidates.size else np.inf))
        nuclei += _tumour_renderer(PATTERNS[other][0], overlap)(ctx, maps, minority, psi)
        tumour = tumour & ~minority
        nuclei += _tumour_renderer(renderer, overlap)(ctx, maps, tumour, psi)
        tumour |= minority
    else:
        nuclei += _tumour_renderer(renderer, overlap if label in CLASSES else 0.0)(ctx, maps, tumour, psi)
    maps.tumour = tumour
    nuclei.append(_stroma_nuclei(ctx, ~tumour, psi))
    # staining texture: fine granularity, then uneven uptake over a few hundred pixels
    grain = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.7)
    grain *= np.float32(1 / 0.4)  # ~unit variance after the blur
    uptake = 1 + 0.07 * ctx.noise(250)
    maps.eosin *= uptake * (1 + 0.08 * grain)
    maps.mucin *= uptake
    if tuple(nuclei_drift) != (1.0, 1.0):
        nuclei = [drift_nuclei(spec, *nuclei_drift, rng, shape) for spec in nuclei]
    for spec in nuclei:
        stamp_nuclei(maps.hema, *(np.asarray(x, dtype=np.float32) for x in spec))
    maps.hema *= uptake * (1 + 0.12 * grain)
    for arr in (maps.hema, maps.eosin, maps.mucin):
        np.clip(arr, 0.0, 3.0, out=arr)
    return maps


# ----------------------------------------------------------------------------------------- tissue shapes


def wsi_tissue_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One to three irregular blobs covering roughly 35-60% of the image, clear of the borders."""
    step = 8
    gh, gw = height // step + 2, width // step + 2
    yy = (np.arange(gh, dtype=np.float32) * step / max(height - 1, 1))[:, None]
    xx = (np.arange(gw, dtype=np.float32) * step / max(width - 1, 1))[None, :]
    envelope = np.zeros((gh, gw), np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.75)
        sy, sx = rng.uniform(0.17, 0.32), rng.uniform(0.17, 0.32)
        envelope = np.maximum(envelope, np.exp(-(((yy - cy) / sy) ** 2) - ((xx - cx) / sx) ** 2))
    edge = np.clip(np.minimum(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx)) / 0.12, 0, 1)
    taper = edge * edge * (3 - 2 * edge)  # smoothstep: tissue fades out towards the borders
    field = (envelope + 0.45 * smooth_noise(rng, (gh, gw), min(gh, gw) / 3)) * taper - (1 - taper)
    low = field > np.quantile(field, 1 - rng.uniform(0.36, 0.56))
    labels, count = ndi.label(low)
    if count > 1:  # drop crumbs, keep the blobs
        sizes = np.bincount(labels.ravel())[1:]
        low &= ~np.isin(labels, 1 + np.flatnonzero(sizes < 0.05 * sizes.max()))
    low = ndi.binary_fill_holes(low)
    soft = ndi.gaussian_filter(low.astype(np.float32), 1.2)
    full = upsample(soft, step, height, width)
    full += 0.06 * smooth_noise(rng, (height, width), 24)  # slightly ragged edge
    return full > 0.5


def tma_core_mask(rng: np.random.Generator, side: int) -> np.ndarray:
    """One roughly circular core, diameter ~85% of the side, with a slightly irregular edge."""
    cy, cx = side / 2 + rng.normal(0, 0.01 * side, 2)
    yy = np.arange(side, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(side, dtype=np.float32)[None, :] - np.float32(cx)
    r = np.sqrt(yy * yy + xx * xx)
    phi = np.arctan2(yy, xx)
    radius = np.full_like(r, 0.425 * side * rng.uniform(0.97, 1.02))
    for k in range(2, 7):
        radius *= 1 + np.float32(rng.normal(0, 0.022 / k)) * np.cos(k * phi + np.float32(rng.uniform(0, 2 * np.pi)))
    radius += 2.0 * smooth_noise(rng, (side, side), 12)
    return r < radius
