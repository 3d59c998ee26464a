"""The in-memory model of one detector frame: pixels, mask and geometry.

Readers produce a :class:`DiffractionImage`; spot finding and the per-image
statistics consume one. Nothing here knows about files or Kafka.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from beamstream.diffraction.errors import GeometryError


@dataclass(frozen=True)
class DetectorGeometry:
    """A flat, single-panel detector normal to the beam (the MX case).

    Units follow DIALS/dxtbx conventions: distances in mm, wavelength in Å,
    the beam centre in pixels (fast, slow) with pixel centres at +0.5.
    """

    wavelength_A: float
    distance_mm: float
    beam_center_px: tuple[float, float]
    pixel_size_mm: tuple[float, float]
    image_size_px: tuple[int, int]  # (fast, slow) = (width, height)
    trusted_range: tuple[float, float] = (0.0, 65535.0)
    # Optional full dxtbx-style panel frame; when None the panel is normal to
    # the beam at `distance_mm` (good to ~1e-4 relative for MX detectors).
    fast_axis: tuple[float, float, float] | None = None
    slow_axis: tuple[float, float, float] | None = None
    origin_mm: tuple[float, float, float] | None = None
    detector_name: str = ""
    thickness_mm: float = 0.0
    mu_per_mm: float = 0.0  # attenuation for the parallax correction, 0 = none

    def __post_init__(self) -> None:
        values = {
            "wavelength_A": self.wavelength_A,
            "distance_mm": self.distance_mm,
            "beam_center_px[0]": self.beam_center_px[0],
            "beam_center_px[1]": self.beam_center_px[1],
            "pixel_size_mm[0]": self.pixel_size_mm[0],
            "pixel_size_mm[1]": self.pixel_size_mm[1],
        }
        for name, value in values.items():
            if not math.isfinite(value):
                raise GeometryError(f"detector geometry: {name} is not finite ({value!r})")
        for name in ("wavelength_A", "distance_mm", "pixel_size_mm[0]", "pixel_size_mm[1]"):
            if values[name] <= 0:
                raise GeometryError(f"detector geometry: {name} must be positive, got {values[name]!r}")
        if self.image_size_px[0] <= 0 or self.image_size_px[1] <= 0:
            raise GeometryError(f"detector geometry: image size must be positive, got {self.image_size_px!r}")


@dataclass
class DiffractionImage:
    """One frame: counts, a validity mask and the geometry to interpret them.

    ``data`` has shape (slow, fast) and a numeric dtype; ``mask`` is True where
    a pixel may be used (inside the trusted range, not a gap or bad pixel).
    """

    data: np.ndarray
    mask: np.ndarray
    geometry: DetectorGeometry
    source: str = ""
    frame_index: int = 0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.ndim != 2:
            raise GeometryError(f"image data must be 2-D, got shape {self.data.shape}")
        if self.mask.shape != self.data.shape:
            raise GeometryError(
                f"mask shape {self.mask.shape} does not match data shape {self.data.shape}"
            )
