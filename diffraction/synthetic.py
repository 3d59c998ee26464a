"""Deterministic synthetic diffraction stills for demos, tests and load generation.

A frame is the sum of

* a Poisson background falling off with resolution, with a diffuse water ring
  and optionally sharp hexagonal-ice rings;
* Bragg spots of a randomly oriented crystal (orientation from the seed): the
  reciprocal-lattice points close to the Ewald sphere of a still, each drawn as
  a small Gaussian stamp whose expected counts fade with resolution (Wilson
  B-factor), scatter like acentric intensities (exponential) and shrink with
  the distance from the sphere (partiality);
* detector defects: module gaps (-1), dead pixels (-2), unmasked hot pixels.

``strength`` in [0, 1] scales the crystal: 0 gives background only, 1 a well
diffracting crystal; a grid-scan simulator maps crystal position to strength.
Everything random comes from ``numpy.random.default_rng(seed)`` so equal
arguments give identical frames. Writers for CBF and EIGER HDF5 are in
:mod:`diffraction.writers` (re-exported here).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from beamstream.diffraction.detectors import DetectorPreset, get_preset, module_gap_mask, sensor_mu_per_mm
from beamstream.diffraction.image import DetectorGeometry, DiffractionImage
from beamstream.diffraction.readers._common import make_geometry, trusted_mask
from beamstream.diffraction.writers import write_cbf, write_nexus

__all__ = ["Crystal", "SyntheticSpec", "generate_frames", "generate_image", "write_cbf", "write_nexus"]

# d-spacings (Å) and relative strengths of the hexagonal ice (Ih) powder rings.
ICE_RINGS = ((3.897, 1.0), (3.669, 0.6), (3.441, 0.55), (2.671, 0.25), (2.249, 0.3),
             (2.072, 0.2), (1.948, 0.1), (1.918, 0.15), (1.883, 0.1), (1.721, 0.05))
_ICE_RING_WIDTH = 0.0015  # Gaussian sigma in 1/d (1/Å): sharp, a few pixels wide
_WATER_RING = (0.31, 0.06)  # centre and sigma in 1/d: the diffuse solvent ring near 3.2 Å
_LEVELS = 128  # background levels the expected-counts map is quantised to
_POOL_BITS = 11  # 2048 pre-drawn Poisson samples per level
_D_MAX = 40.0  # no spots inside this resolution: the beamstop shadow


@dataclass(frozen=True)
class Crystal:
    """The sample: unit cell (Å, degrees), Wilson B (Å²), mosaic spread and resolution limit."""

    unit_cell: tuple[float, float, float, float, float, float] = (57.8, 57.8, 150.2, 90.0, 90.0, 90.0)
    b_factor: float = 20.0
    mosaicity_deg: float = 0.08
    d_min_A: float = 1.5


@dataclass(frozen=True)
class SyntheticSpec:
    """Experiment and detector settings; the defaults resemble a thaumatin grid scan.

    ``distance_mm`` and ``beam_center_px`` default from the detector preset.
    ``spot_scale`` is the expected total counts of a low-resolution spot of
    average intensity at strength 1; ``background`` the mean counts per pixel
    near the beam. With ``ice_rings``, the rings get a smooth part
    (``ice_ring_counts`` per pixel at the peak) and ``ice_spots`` crystallite
    reflections scattered along them, which is what makes real ice rings
    produce spurious spots.
    """

    detector: str = "pilatus6m"
    wavelength_A: float = 0.96859
    distance_mm: float | None = None
    beam_center_px: tuple[float, float] | None = None
    crystal: Crystal = field(default_factory=Crystal)
    spot_scale: float = 2500.0
    spot_sigma_mm: float = 0.13
    background: float = 1.2
    ice_rings: bool = False
    ice_ring_counts: float = 6.0
    ice_spots: int = 400
    ice_spot_counts: float = 400.0
    n_hot_pixels: int = 15
    n_dead_pixels: int = 40
    exposure_time_s: float = 0.02

    @property
    def preset(self) -> DetectorPreset:
        """The detector preset named by ``detector``."""
        return get_preset(self.detector)

    def geometry(self) -> DetectorGeometry:
        """The detector geometry frames of this spec carry."""
        preset = self.preset
        nx, ny = preset.image_size_px
        # Real beam centres are rarely at the exact middle; offset a little.
        centre = self.beam_center_px or (round(0.512 * nx, 2), round(0.517 * ny, 2))
        return make_geometry(
            f"synthetic {preset.key}",
            wavelength_A=self.wavelength_A,
            distance_mm=self.distance_mm or preset.default_distance_mm,
            beam_center_px=centre,
            pixel_size_mm=(preset.pixel_size_mm, preset.pixel_size_mm),
            image_size_px=(nx, ny),
            trusted_range=(0.0, float(preset.count_cutoff)),
            detector_name=preset.name,
            thickness_mm=preset.thickness_mm,
            mu_per_mm=sensor_mu_per_mm("Si", self.wavelength_A),
        )


def generate_image(
    spec: SyntheticSpec | None = None,
    *,
    seed: int = 0,
    strength: float = 1.0,
    orientation_seed: int | None = None,
    frame_index: int = 0,
) -> DiffractionImage:
    """One synthetic still: int32 counts (-1 gaps, -2 dead pixels), mask and geometry.

    ``orientation_seed`` fixes the crystal orientation independently of the
    noise (several frames of one crystal); by default it is ``seed``.
    ``metadata`` records the seed, strength and the rendered spots
    (``spot_xy_px``, ``spot_counts``, ``spot_d_A``) for tests and demos.
    """
    spec = spec or SyntheticSpec()
    if not 0.0 <= strength <= 1.0 or not math.isfinite(strength):
        raise ValueError(f"strength must be within [0, 1], got {strength!r}")
    preset = spec.preset
    geometry = spec.geometry()
    nx, ny = geometry.image_size_px
    rng = np.random.default_rng(seed)

    data = _background(rng, geometry, spec)
    spots = _bragg_spots(spec, geometry, strength, seed if orientation_seed is None else orientation_seed, rng)
    ice = _ice_spots(spec, geometry, rng)
    _add_spots(
        data,
        np.concatenate([spots["xy"], ice["xy"]]),
        np.concatenate([spots["counts"], ice["counts"]]),
        geometry,
        spec.spot_sigma_mm,
        rng,
    )

    gaps = module_gap_mask((nx, ny), preset.layout)
    dead, hot = _defect_pixels(preset, spec.n_dead_pixels, spec.n_hot_pixels)
    flat = data.reshape(-1)
    flat[hot] = rng.integers(300, 20_000, size=hot.size, dtype=np.int32)
    flat[dead] = -2
    if gaps is not None:
        data[gaps] = -1

    metadata = {
        "format": "synthetic",
        "detector": preset.name,
        "seed": seed,
        "strength": strength,
        "exposure_time": spec.exposure_time_s,
        "spot_xy_px": spots["xy"],
        "spot_counts": spots["counts"],
        "spot_d_A": spots["d"],
        "ice_spot_xy_px": ice["xy"],
        "orientation": spots["orientation"],
    }
    return DiffractionImage(
        data=data,
        mask=trusted_mask(data, geometry.trusted_range, None if gaps is None else ~gaps),
        geometry=geometry,
        source=f"synthetic:{preset.key}:seed={seed}",
        frame_index=frame_index,
        metadata=metadata,
    )


def generate_frames(
    n_frames: int,
    spec: SyntheticSpec | None = None,
    *,
    seed: int = 0,
    strengths: list[float] | None = None,
    orientation_seed: int | None = None,
) -> Iterator[DiffractionImage]:
    """Yield ``n_frames`` images seeded ``seed, seed+1, ...`` with per-frame strengths (default 1).

    One crystal orientation (``orientation_seed``, default ``seed``) is shared
    by all frames, as for a grid scan over one crystal.
    """
    if strengths is not None and len(strengths) != n_frames:
        raise ValueError(f"got {len(strengths)} strengths for {n_frames} frames")
    for i in range(n_frames):
        yield generate_image(
            spec,
            seed=seed + i,
            strength=1.0 if strengths is None else strengths[i],
            orientation_seed=seed if orientation_seed is None else orientation_seed,
            frame_index=i,
        )


# --- background ------------------------------------------------------------------------------


def _inverse_d_map(geometry: DetectorGeometry) -> np.ndarray:
    """1/d (1/Å) at each pixel centre, float32, for a detector normal to the beam."""
    nx, ny = geometry.image_size_px
    bx, by = geometry.beam_center_px
    px, py = geometry.pixel_size_mm
    x = ((np.arange(nx, dtype=np.float32) + 0.5 - bx) * px) ** 2
    y = ((np.arange(ny, dtype=np.float32) + 0.5 - by) * py) ** 2
    r_mm = np.sqrt(y[:, None] + x[None, :])
    two_theta = np.arctan(r_mm / np.float32(geometry.distance_mm))
    return (2.0 * np.sin(two_theta / 2) / np.float32(geometry.wavelength_A)).astype(np.float32)


@lru_cache(maxsize=2)  # an EIGER2 16M entry holds 72 MB
def _background_levels(
    geometry: DetectorGeometry, background: float, ice_rings: bool, ice_counts: float
) -> tuple[np.ndarray, np.ndarray]:
    """(pool offsets per pixel, expected counts per level) for the quantised background.

    Cached: the map depends only on geometry and settings, not on the seed.
    """
    q = _inverse_d_map(geometry)
    falloff = np.float32(background) * (0.35 + 0.65 * np.exp(-((q / 0.3) ** 2)))
    centre, width = _WATER_RING
    expected = falloff + np.float32(0.4 * background) * np.exp(-(((q - centre) / width) ** 2) / 2)
    if ice_rings:
        for d, relative in ICE_RINGS:
            band = np.abs(q - 1.0 / d) < 5 * _ICE_RING_WIDTH  # only touch pixels near the ring
            expected[band] += np.float32(ice_counts * relative) * np.exp(
                -(((q[band] - 1.0 / d) / _ICE_RING_WIDTH) ** 2) / 2
            )
    top = float(expected.max())
    level = np.rint(expected * np.float32((_LEVELS - 1) / top)).astype(np.uint32)
    offsets = level << _POOL_BITS
    offsets.setflags(write=False)
    return offsets, np.arange(_LEVELS) * (top / (_LEVELS - 1))


def _background(rng: np.random.Generator, geometry: DetectorGeometry, spec: SyntheticSpec) -> np.ndarray:
    """Poisson background as int32 (slow, fast).

    Drawing a Poisson variate per pixel costs ~0.1 s per megapixel; instead draw
    a pool of samples for each quantised expected level and pick a random pool
    entry per pixel (a uniform integer and a gather), ~10x faster.
    """
    offsets, level_counts = _background_levels(geometry, spec.background, spec.ice_rings, spec.ice_ring_counts)
    pool = rng.poisson(level_counts[:, None], size=(_LEVELS, 1 << _POOL_BITS)).astype(np.int32).ravel()
    index = rng.integers(0, 1 << _POOL_BITS, size=offsets.shape, dtype=np.uint32)
    index += offsets
    return pool[index]


# --- Bragg spots ----------------------------------------------------------------------------


def _reciprocal_basis(cell: tuple[float, ...]) -> np.ndarray:
    """B: columns are a*, b*, c* (1/Å) in a Cartesian frame fixed to the crystal."""
    a, b, c = cell[:3]
    alpha, beta, gamma = np.radians(cell[3:])
    cos_a, cos_b, cos_g, sin_g = np.cos(alpha), np.cos(beta), np.cos(gamma), np.sin(gamma)
    cz = math.sqrt(max(1.0 - cos_b**2 - ((cos_a - cos_b * cos_g) / sin_g) ** 2, 0.0))
    real = np.array(
        [
            [a, 0.0, 0.0],
            [b * cos_g, b * sin_g, 0.0],
            [c * cos_b, c * (cos_a - cos_b * cos_g) / sin_g, c * cz],
        ]
    )
    return np.linalg.inv(real)  # rows of `real` are a, b, c, so real @ B = I


@lru_cache(maxsize=4)
def _lattice_points(cell: tuple[float, ...], d_min: float) -> np.ndarray:
    """B·h for every Miller index with d in [d_min, _D_MAX] (N x 3, crystal frame). Cached."""
    basis = _reciprocal_basis(cell)
    limits = [math.ceil(length / d_min) for length in cell[:3]]  # |h| <= |a| / d_min
    axes = [np.arange(-n, n + 1, dtype=np.float64) for n in limits]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    points = hkl @ basis.T
    inv_d = np.sqrt(np.einsum("ij,ij->i", points, points))
    keep = (inv_d <= 1.0 / d_min) & (inv_d >= 1.0 / _D_MAX)
    result = points[keep]
    result.setflags(write=False)
    return result


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed rotation matrix (normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _detector_d_min(geometry: DetectorGeometry) -> float:
    """Resolution at the detector corner farthest from the beam centre."""
    nx, ny = geometry.image_size_px
    bx, by = geometry.beam_center_px
    px, py = geometry.pixel_size_mm
    r = math.hypot(max(bx, nx - bx) * px, max(by, ny - by) * py)
    theta = math.atan(r / geometry.distance_mm) / 2
    return geometry.wavelength_A / (2 * math.sin(theta))


def _bragg_spots(
    spec: SyntheticSpec, geometry: DetectorGeometry, strength: float, orientation_seed: int, rng: np.random.Generator
) -> dict:
    """Positions (px), expected counts and d of the reflections in diffracting condition."""
    orientation = _random_rotation(np.random.default_rng([orientation_seed, 0x5EED]))
    empty = {"xy": np.zeros((0, 2)), "counts": np.zeros(0), "d": np.zeros(0), "orientation": orientation}
    if strength <= 0.0:
        return empty
    crystal = spec.crystal
    d_limit = max(crystal.d_min_A, _detector_d_min(geometry))
    points = _lattice_points(tuple(crystal.unit_cell), round(d_limit, 3)) @ orientation.T
    wavelength = geometry.wavelength_A
    # Beam along -z (imgCIF): s0 = (0, 0, -1/λ); a point diffracts when |s0 + r| ≈ 1/λ.
    s1 = points.copy()
    s1[:, 2] -= 1.0 / wavelength
    excitation = np.sqrt(np.einsum("ij,ij->i", s1, s1)) - 1.0 / wavelength
    inv_d = np.sqrt(np.einsum("ij,ij->i", points, points))
    # Mosaic spread and beam divergence widen the reflecting range with 1/d.
    width = 2e-4 + inv_d * math.radians(crystal.mosaicity_deg)
    near = (np.abs(excitation) < 3 * width) & (s1[:, 2] < 0)
    s1, excitation, inv_d, width = s1[near], excitation[near], inv_d[near], width[near]

    # Project onto the detector plane z = -distance; slow axis is -y (dxtbx convention).
    t = -geometry.distance_mm / s1[:, 2]
    bx, by = geometry.beam_center_px
    px, py = geometry.pixel_size_mm
    x = bx + t * s1[:, 0] / px
    y = by - t * s1[:, 1] / py
    nx, ny = geometry.image_size_px
    inside = (x >= 0) & (x < nx) & (y >= 0) & (y < ny)

    # Weaker crystals also diffract to lower resolution: raise B as strength falls.
    b_factor = crystal.b_factor + 60.0 * (1.0 - strength)
    wilson = np.exp(-2.0 * b_factor * (inv_d / 2) ** 2)
    partiality = np.exp(-0.5 * (excitation / width) ** 2)
    acentric = rng.exponential(size=inv_d.size)
    counts = spec.spot_scale * strength * wilson * partiality * acentric
    keep = inside & (counts >= 2.0)  # fainter than ~2 photons is invisible noise anyway
    return {
        "xy": np.column_stack([x[keep], y[keep]]),
        "counts": counts[keep],
        "d": 1.0 / inv_d[keep],
        "orientation": orientation,
    }


def _ice_spots(spec: SyntheticSpec, geometry: DetectorGeometry, rng: np.random.Generator) -> dict:
    """Reflections of ice crystallites: random azimuths on the ice rings, stronger rings get more."""
    if not spec.ice_rings or spec.ice_spots <= 0:
        return {"xy": np.zeros((0, 2)), "counts": np.zeros(0)}
    d, relative = np.array(ICE_RINGS).T
    ring = rng.choice(d.size, size=spec.ice_spots, p=relative / relative.sum())
    two_theta = 2 * np.arcsin(geometry.wavelength_A / (2 * d[ring]))
    radius_mm = geometry.distance_mm * np.tan(two_theta)
    phi = rng.uniform(0, 2 * np.pi, size=spec.ice_spots)
    bx, by = geometry.beam_center_px
    x = bx + radius_mm * np.cos(phi) / geometry.pixel_size_mm[0]
    y = by + radius_mm * np.sin(phi) / geometry.pixel_size_mm[1]
    nx, ny = geometry.image_size_px
    inside = (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
    counts = spec.ice_spot_counts * rng.exponential(size=spec.ice_spots)
    return {"xy": np.column_stack([x, y])[inside], "counts": counts[inside]}


def _add_spots(
    data: np.ndarray,
    xy: np.ndarray,
    counts: np.ndarray,
    geometry: DetectorGeometry,
    sigma_mm: float,
    rng: np.random.Generator,
) -> None:
    """Add Poisson-sampled Gaussian stamps (one small window per spot) to ``data`` in place."""
    if counts.size == 0:
        return
    ny, nx = data.shape
    sigma = sigma_mm / geometry.pixel_size_mm[0]
    half = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-half, half + 1)
    ix = np.floor(xy[:, 0]).astype(np.int64)[:, None, None] + offsets[None, None, :]
    iy = np.floor(xy[:, 1]).astype(np.int64)[:, None, None] + offsets[None, :, None]
    # Gaussian evaluated at pixel centres, normalised per spot so each stamp sums to its counts.
    gx = np.exp(-0.5 * ((ix + 0.5 - xy[:, 0, None, None]) / sigma) ** 2)
    gy = np.exp(-0.5 * ((iy + 0.5 - xy[:, 1, None, None]) / sigma) ** 2)
    weights = gx * gy
    weights *= (counts / weights.sum(axis=(1, 2)))[:, None, None]
    ix, iy = np.broadcast_arrays(ix, iy)
    valid = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    flat_index = (iy[valid] * nx + ix[valid]).astype(np.int64)
    pixels, inverse = np.unique(flat_index, return_inverse=True)
    expected = np.bincount(inverse, weights=weights[valid])
    # Independent Poisson variates add, so sampling the spot part on its own is exact.
    flat = data.reshape(-1)
    total = flat[pixels].astype(np.int64) + rng.poisson(expected)
    flat[pixels] = np.minimum(total, np.iinfo(np.int32).max).astype(np.int32)


@lru_cache(maxsize=8)
def _defect_pixels(preset: DetectorPreset, n_dead: int, n_hot: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of dead and hot pixels on active area: fixed per detector model, like real defects."""
    rng = np.random.default_rng(zlib.crc32(preset.key.encode()))
    nx, ny = preset.image_size_px
    gaps = module_gap_mask((nx, ny), preset.layout)
    wanted = n_dead + n_hot
    # Gaps are under 10 % of any preset, so four times as many candidates always suffice.
    candidates = rng.choice(nx * ny, size=4 * wanted, replace=False)
    if gaps is not None:
        candidates = candidates[~gaps.reshape(-1)[candidates]]
    return candidates[:n_dead], candidates[n_dead:wanted]
