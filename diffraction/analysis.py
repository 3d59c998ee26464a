"""Public entry point: per-image spot finding and DIALS per-image-analysis statistics.

>>> result = analyse_image(image)                     # DIALS defaults, numba backend
>>> result.to_dict()["n_spots_no_ice"]

``analyse_image`` thresholds the frame (``dispersion_extended`` by default),
groups strong pixels into spots, and computes the statistics DIALS's
``per_image_analysis`` reports. Frames with nothing to find (all zero,
saturated, fully masked) give a valid empty result. Undefined resolution
figures are ``None`` (DIALS prints -1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from beamstream.diffraction.errors import SpotFindingParameterError
from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.resolution import resolution_mask
from beamstream.diffraction.spotfinder import SpotFilterParams, empty_spots, find_spots
from beamstream.diffraction.statistics import (
    DEFAULT_ICE_RING_WIDTH,
    STAT_FIELDS,
    PerImageStatistics,
    statistics_from_spots,
)
from beamstream.diffraction.threshold import ALGORITHMS, ThresholdParams, threshold_image

__all__ = [
    "ImageAnalysis",
    "SpotFindingParams",
    "analyse_image",
    "statistics_from_spots",
    "warm_up",
    "IMAGE_ANALYSIS_FIELDS",
]

Backend = Literal["numba", "numpy", "dials"]
BACKENDS: tuple[str, ...] = ("numba", "numpy", "dials")

# DIALS's "Auto" minimum spot size for pixel-array detectors (6 for CCDs); Beamstream reads PADs.
AUTO_MIN_SPOT_SIZE_PAD = 3

IMAGE_ANALYSIS_FIELDS: tuple[str, ...] = STAT_FIELDS + ("n_strong_pixels", "time_threshold_s", "time_total_s")


@dataclass(frozen=True)
class SpotFindingParams:
    """Spot-finding and per-image-analysis settings; defaults are DIALS's.

    ``min_spot_size=None`` is DIALS's ``Auto`` (3 pixels for pixel-array
    detectors). ``d_min``/``d_max`` (Å) mask pixels outside the resolution range
    before thresholding, as DIALS's ``spotfinder.filter.d_min/d_max``.
    ``backend='dials'`` runs DIALS's own threshold and spot extraction (DIALS
    must be importable).
    """

    threshold_algorithm: Literal["dispersion_extended", "dispersion"] = "dispersion_extended"
    kernel_size: tuple[int, int] = (3, 3)
    gain: float | None = None
    sigma_background: float = 6.0
    sigma_strong: float = 3.0
    min_local: int = 2
    global_threshold: float = 0.0
    min_spot_size: int | None = None
    max_spot_size: int = 1000
    max_separation: float | None = 2.0
    max_strong_pixel_fraction: float = 0.25
    d_min: float | None = None
    d_max: float | None = None
    filter_ice: bool = True
    ice_rings_width: float = DEFAULT_ICE_RING_WIDTH
    resolution_analysis: bool = True
    backend: Backend = "numba"

    def __post_init__(self) -> None:
        if self.threshold_algorithm not in ALGORITHMS:
            raise SpotFindingParameterError(
                f"unknown threshold_algorithm {self.threshold_algorithm!r}; choose one of {ALGORITHMS}"
            )
        if self.backend not in BACKENDS:
            raise SpotFindingParameterError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        for name in ("d_min", "d_max"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SpotFindingParameterError(f"{name} must be > 0 Å, got {value!r}")
        if self.d_min is not None and self.d_max is not None and self.d_min > self.d_max:
            raise SpotFindingParameterError(f"d_min = {self.d_min} > d_max = {self.d_max}: no spots would be found")
        if not self.ice_rings_width > 0:
            raise SpotFindingParameterError(f"ice_rings_width must be > 0, got {self.ice_rings_width!r}")
        # Validate the derived parameter sets now rather than on the first frame.
        self.threshold_params()
        self.filter_params()

    def threshold_params(self) -> ThresholdParams:
        """The threshold part of these parameters."""
        return ThresholdParams(
            kernel_size=tuple(self.kernel_size),
            gain=self.gain,
            sigma_background=self.sigma_background,
            sigma_strong=self.sigma_strong,
            min_local=self.min_local,
            global_threshold=self.global_threshold,
        )

    def filter_params(self) -> SpotFilterParams:
        """The spot filter part of these parameters (``Auto`` resolved)."""
        min_size = AUTO_MIN_SPOT_SIZE_PAD if self.min_spot_size is None else self.min_spot_size
        return SpotFilterParams(
            min_spot_size=min_size,
            max_spot_size=self.max_spot_size,
            max_separation=self.max_separation,
            max_strong_pixel_fraction=self.max_strong_pixel_fraction,
        )


@dataclass(frozen=True)
class ImageAnalysis(PerImageStatistics):
    """Per-image result: DIALS's nine statistics (inherited), the strong-pixel count and timings.

    ``spots`` (a :data:`diffraction.spotfinder.SPOT_DTYPE` array) rides along
    but is not part of :meth:`to_dict`.
    """

    n_strong_pixels: int = 0
    time_threshold_s: float = 0.0
    time_total_s: float = 0.0
    spots: np.ndarray = field(default_factory=empty_spots, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The statistics, ``n_strong_pixels`` and timings as plain JSON-ready values."""
        return {name: getattr(self, name) for name in IMAGE_ANALYSIS_FIELDS}

    @classmethod
    def from_statistics(cls, stats: PerImageStatistics, **extra) -> ImageAnalysis:
        """Combine :class:`PerImageStatistics` with the spot-finding extras."""
        return cls(**stats.to_dict(), **extra)


def analyse_image(image: DiffractionImage, params: SpotFindingParams | None = None) -> ImageAnalysis:
    """Find spots on one frame and compute DIALS's per-image statistics.

    Raises :class:`diffraction.errors.SpotFindingError` when more than
    ``max_strong_pixel_fraction`` of the pixels are strong (DIALS refuses such
    frames too) and :class:`diffraction.errors.BackendUnavailableError` for
    ``backend='dials'`` without DIALS.
    """
    started = time.perf_counter()
    params = params or SpotFindingParams()
    data = image.data
    mask = np.asarray(image.mask, dtype=bool)
    keep = resolution_mask(image.geometry, data.shape, params.d_min, params.d_max)
    if keep is not None:
        mask = mask & keep

    if params.backend == "dials":
        from beamstream.diffraction.dials_backend import find_spots_with_dials

        spots, n_strong, time_threshold = find_spots_with_dials(data, mask, params)
    else:
        t0 = time.perf_counter()
        strong = threshold_image(
            data, mask, params.threshold_params(), algorithm=params.threshold_algorithm, backend=params.backend
        )
        time_threshold = time.perf_counter() - t0
        n_strong = int(np.count_nonzero(strong))
        spots = find_spots(data, strong, params.filter_params(), backend=params.backend)

    stats = statistics_from_spots(
        spots,
        image.geometry,
        resolution_analysis=params.resolution_analysis,
        filter_ice=params.filter_ice,
        ice_rings_width=params.ice_rings_width,
    )
    return ImageAnalysis.from_statistics(
        stats,
        n_strong_pixels=n_strong,
        time_threshold_s=time_threshold,
        time_total_s=time.perf_counter() - started,
        spots=spots,
    )


def warm_up() -> None:
    """Compile (or load from numba's cache) every numba kernel on a tiny frame.

    Call once when a worker starts so the first real frame is not charged with
    JIT compilation (seconds on a cold cache).
    """
    from beamstream.diffraction.image import DetectorGeometry

    rng = np.random.default_rng(0)
    data = rng.poisson(2, size=(32, 32)).astype(np.int32)
    data[10:13, 10:13] += 200
    geometry = DetectorGeometry(
        wavelength_A=1.0, distance_mm=100.0, beam_center_px=(16.0, 16.0), pixel_size_mm=(0.1, 0.1),
        image_size_px=(32, 32),
    )
    image = DiffractionImage(data=data, mask=np.ones(data.shape, dtype=bool), geometry=geometry)
    for algorithm in ALGORITHMS:
        analyse_image(image, SpotFindingParams(threshold_algorithm=algorithm))
