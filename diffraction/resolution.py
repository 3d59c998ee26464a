"""Pixel positions to reciprocal space: lab frame, parallax, |s1 - s0| and resolution masks.

Follows dxtbx's conventions: a panel is an ``origin`` plus ``fast`` and
``slow`` unit axes in the lab frame (mm); a pixel coordinate (fast, slow)
times the pixel size is the *uncorrected* mm coordinate, and with
``ParallaxCorrectedPxMmStrategy`` (sensor thickness and attenuation known) the
mm coordinate is moved back along the ray by the mean absorption depth. The
beam runs along -z (dxtbx's default ``direction`` (0, 0, 1) points back to the
source), so ``s0 = (0, 0, -1/wavelength)``.

Without explicit axes a :class:`DetectorGeometry` describes a panel normal to
the beam: ``fast = (1, 0, 0)``, ``slow = (0, -1, 0)`` and the origin placed so
that the beam centre lies ``distance_mm`` downstream on the axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from beamstream.diffraction.errors import GeometryError
from beamstream.diffraction.image import DetectorGeometry

_ROW_CHUNK = 256


@dataclass(frozen=True)
class PanelFrame:
    """The numbers the px -> reciprocal-space mapping needs, as float64 arrays."""

    fast: np.ndarray
    slow: np.ndarray
    origin: np.ndarray
    pixel_size: tuple[float, float]
    s0: np.ndarray
    wavelength: float
    mu: float
    thickness: float

    @property
    def parallax(self) -> bool:
        """True when dxtbx would use its parallax-corrected px/mm strategy."""
        return self.mu > 0 and self.thickness > 0


def panel_frame(geometry: DetectorGeometry) -> PanelFrame:
    """The lab-frame panel description of ``geometry`` (explicit axes, or normal incidence)."""
    psx, psy = (float(p) for p in geometry.pixel_size_mm)
    if geometry.fast_axis is not None and geometry.slow_axis is not None and geometry.origin_mm is not None:
        fast = np.asarray(geometry.fast_axis, dtype=np.float64)
        slow = np.asarray(geometry.slow_axis, dtype=np.float64)
        origin = np.asarray(geometry.origin_mm, dtype=np.float64)
        if not (np.all(np.isfinite(fast)) and np.all(np.isfinite(slow)) and np.all(np.isfinite(origin))):
            raise GeometryError("detector geometry: panel axes/origin are not finite")
        if np.linalg.norm(np.cross(fast, slow)) == 0:
            raise GeometryError("detector geometry: fast and slow axes are parallel")
    else:
        bx, by = (float(b) for b in geometry.beam_center_px)
        fast = np.array([1.0, 0.0, 0.0])
        slow = np.array([0.0, -1.0, 0.0])
        origin = np.array([-bx * psx, by * psy, -float(geometry.distance_mm)])
    wavelength = float(geometry.wavelength_A)
    return PanelFrame(
        fast=fast,
        slow=slow,
        origin=origin,
        pixel_size=(psx, psy),
        s0=np.array([0.0, 0.0, -1.0 / wavelength]),
        wavelength=wavelength,
        mu=float(geometry.mu_per_mm or 0.0),
        thickness=float(geometry.thickness_mm or 0.0),
    )


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of (..., 3) arrays (either may be a single 3-vector)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _lab(frame: PanelFrame, x_mm: np.ndarray, y_mm: np.ndarray) -> np.ndarray:
    """origin + x*fast + y*slow for arrays of mm coordinates; shape (..., 3)."""
    return (
        frame.origin
        + np.asarray(x_mm)[..., None] * frame.fast
        + np.asarray(y_mm)[..., None] * frame.slow
    )


def pixel_to_millimetre(frame: PanelFrame, x_px, y_px) -> tuple[np.ndarray, np.ndarray]:
    """dxtbx ``pixel_to_millimeter``: simple scaling, then the inverse parallax correction."""
    x_mm = np.asarray(x_px, dtype=np.float64) * frame.pixel_size[0]
    y_mm = np.asarray(y_px, dtype=np.float64) * frame.pixel_size[1]
    if not frame.parallax:
        return x_mm, y_mm
    ray = _lab(frame, x_mm, y_mm)
    ray = ray / np.sqrt(_dot(ray, ray))[..., None]
    normal = np.cross(frame.fast, frame.slow)
    if float(np.dot(frame.origin, normal)) < 0:
        normal = -normal
    cos_t = _dot(ray, normal)
    if np.any(cos_t <= 0):
        raise GeometryError("detector geometry: a ray meets the sensor from behind (parallax correction)")
    mu, t0 = frame.mu, frame.thickness
    # Mean depth at which an X-ray is absorbed, measured along the ray.
    depth = (1.0 / mu) - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
    return x_mm - _dot(ray, frame.fast) * depth, y_mm - _dot(ray, frame.slow) * depth


def rlp_norm(frame: PanelFrame, x_px, y_px) -> np.ndarray:
    """|s1 - s0| (1/Å) of pixel positions: the reciprocal-lattice-point length, d* = 1/d."""
    x_mm, y_mm = pixel_to_millimetre(frame, x_px, y_px)
    lab = _lab(frame, x_mm, y_mm)
    s1 = lab / np.sqrt(_dot(lab, lab))[..., None] * (1.0 / frame.wavelength)
    scattering = s1 - frame.s0
    return np.sqrt(_dot(scattering, scattering))


def spot_rlp_norm(geometry: DetectorGeometry, x_px, y_px) -> np.ndarray:
    """|s1 - s0| for spot centroids given in pixels (see :func:`rlp_norm`)."""
    return rlp_norm(panel_frame(geometry), x_px, y_px)


def pixel_resolution_rows(frame: PanelFrame, width: int, rows: np.ndarray) -> np.ndarray:
    """d-spacing (Å) at the centre of every pixel of the given rows, as DIALS's mask generator has it."""
    xs = np.arange(width) + 0.5
    ys = rows.astype(np.float64) + 0.5
    x_grid, y_grid = np.meshgrid(xs, ys)
    length = rlp_norm(frame, x_grid, y_grid)
    at_beam = length == 0
    if np.any(at_beam):  # DIALS shifts a pixel centred on the beam to its corner
        length[at_beam] = rlp_norm(frame, x_grid[at_beam] + 0.5, y_grid[at_beam] + 0.5)
    return 1.0 / length


def resolution_mask(geometry: DetectorGeometry, shape: tuple[int, int], d_min: float | None,
                    d_max: float | None) -> np.ndarray | None:
    """Pixels DIALS's ``d_min`` / ``d_max`` filters keep (True), or None when neither is set.

    ``d_min`` drops pixels with ``d <= d_min``; ``d_max`` drops pixels with
    ``d_max <= d <= max(d_max + 1, 1e9)``, exactly as ``dials.util.masking``.
    The result is cached per geometry and read-only.
    """
    if d_min is None and d_max is None:
        return None
    return _resolution_mask_cached(geometry, tuple(int(s) for s in shape), d_min, d_max)


@lru_cache(maxsize=4)
def _resolution_mask_cached(geometry: DetectorGeometry, shape: tuple[int, int], d_min: float | None,
                            d_max: float | None) -> np.ndarray:
    height, width = shape
    frame = panel_frame(geometry)
    keep = np.ones(shape, dtype=bool)
    for start in range(0, height, _ROW_CHUNK):
        rows = np.arange(start, min(start + _ROW_CHUNK, height))
        d = pixel_resolution_rows(frame, width, rows)
        drop = np.zeros(d.shape, dtype=bool)
        if d_min is not None:
            drop |= (d >= 0) & (d <= d_min)
        if d_max is not None:
            drop |= (d >= d_max) & (d <= max(d_max + 1, 1e9))
        keep[rows] = ~drop
    keep.setflags(write=False)
    return keep
