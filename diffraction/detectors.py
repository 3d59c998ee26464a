"""Pixel-array detector layouts: module tiling, inter-module gaps and presets.

PILATUS and EIGER detectors are tiles of identical modules separated by
insensitive gaps. Readers use the layout to mask the gaps even when a file does
not flag them; the synthetic generator uses the presets to draw realistic frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class ModuleLayout:
    """Module size and gap widths of one detector family, in pixels (fast, slow)."""

    family: str
    module_px: tuple[int, int]
    gap_px: tuple[int, int]

    def tiling(self, image_size_px: tuple[int, int]) -> tuple[int, int] | None:
        """Number of modules (fast, slow) that tile ``image_size_px`` exactly, or None."""
        counts = []
        for size, module, gap in zip(image_size_px, self.module_px, self.gap_px, strict=True):
            n, remainder = divmod(size + gap, module + gap)
            if n < 1 or remainder:
                return None
            counts.append(n)
        return counts[0], counts[1]


# Module geometry of the DECTRIS families (the same numbers dxtbx uses).
PILATUS = ModuleLayout("PILATUS", module_px=(487, 195), gap_px=(7, 17))
EIGER = ModuleLayout("EIGER", module_px=(1030, 514), gap_px=(10, 37))
EIGER2 = ModuleLayout("EIGER2", module_px=(1028, 512), gap_px=(12, 38))
LAYOUTS = (PILATUS, EIGER, EIGER2)


@dataclass(frozen=True)
class DetectorPreset:
    """A real detector model the synthetic generator can imitate."""

    key: str
    name: str
    layout: ModuleLayout
    modules: tuple[int, int]  # (fast, slow)
    pixel_size_mm: float
    thickness_mm: float
    count_cutoff: int
    file_format: str  # "cbf" or "nexus": how the real detector writes frames
    default_distance_mm: float

    @property
    def image_size_px(self) -> tuple[int, int]:
        """(fast, slow) size of the full image including gaps."""
        (mf, ms), (gf, gs) = self.layout.module_px, self.layout.gap_px
        nf, ns = self.modules
        return nf * mf + (nf - 1) * gf, ns * ms + (ns - 1) * gs


PRESETS: dict[str, DetectorPreset] = {
    preset.key: preset
    for preset in (
        DetectorPreset("pilatus6m", "PILATUS3 6M", PILATUS, (5, 12), 0.172, 0.45, 1_048_500, "cbf", 350.0),
        DetectorPreset("eiger2_16m", "EIGER2 XE 16M", EIGER2, (4, 8), 0.075, 0.45, 126_000, "nexus", 200.0),
        DetectorPreset("eiger2_4m", "EIGER2 X 4M", EIGER2, (2, 4), 0.075, 0.45, 126_000, "nexus", 120.0),
        # One module wide, two high (1028 x 1062 px): the smallest real EIGER2, fast to simulate for tests.
        DetectorPreset("eiger2_1m", "EIGER2 X 1M", EIGER2, (1, 2), 0.075, 0.45, 126_000, "nexus", 100.0),
    )
}


def get_preset(key: str) -> DetectorPreset:
    """Look a preset up by key (``pilatus6m``, ``eiger2_16m``, ``eiger2_4m``, ``eiger2_1m``)."""
    try:
        return PRESETS[key.lower()]
    except KeyError:
        raise ValueError(f"unknown detector preset {key!r}; choose one of {', '.join(PRESETS)}") from None


def find_layout(image_size_px: tuple[int, int], family_hint: str = "") -> ModuleLayout | None:
    """The module layout that tiles an image of this size, preferring ``family_hint``.

    ``family_hint`` is free text such as a detector name ("PILATUS3 6M").
    Returns None for sizes no known family explains (e.g. a cropped ROI), in
    which case no gap mask is applied.
    """
    words = re.split(r"[^A-Z0-9]+", family_hint.upper())
    hinted = [layout for layout in LAYOUTS if any(word.startswith(layout.family) for word in words)]
    # The longest matching family name wins: "EIGER2" also starts with "EIGER".
    hinted.sort(key=lambda layout: -len(layout.family))
    for layout in hinted + [layout for layout in LAYOUTS if layout not in hinted]:
        tiles = layout.tiling(image_size_px)
        # Any single-module size "tiles"; only trust that when the name agrees.
        if tiles is not None and (tiles != (1, 1) or layout in hinted):
            return layout
    return None


@lru_cache(maxsize=8)
def _gap_mask_cached(image_size_px: tuple[int, int], layout: ModuleLayout) -> np.ndarray:
    fast, slow = image_size_px
    gaps = np.zeros((slow, fast), dtype=bool)
    (mf, ms), (gf, gs) = layout.module_px, layout.gap_px
    for start in range(mf, fast, mf + gf):
        gaps[:, start : start + gf] = True
    for start in range(ms, slow, ms + gs):
        gaps[start : start + gs, :] = True
    gaps.setflags(write=False)
    return gaps


def module_gap_mask(image_size_px: tuple[int, int], layout: ModuleLayout | None) -> np.ndarray | None:
    """Boolean (slow, fast) array, True on inter-module gap pixels; None without a layout.

    The array is cached and read-only: combine it, don't modify it.
    """
    if layout is None or layout.tiling(image_size_px) is None:
        return None
    return _gap_mask_cached(tuple(image_size_px), layout)


# NIST XCOM total mass attenuation coefficients of silicon (keV, cm^2/g), above
# the K edge; log-log interpolation between them is good to ~1 %.
_SI_MU_RHO = np.array(
    [
        (3.0, 978.3),
        (4.0, 464.4),
        (5.0, 245.1),
        (6.0, 147.0),
        (8.0, 63.47),
        (10.0, 33.89),
        (15.0, 10.34),
        (20.0, 4.464),
        (30.0, 1.436),
        (40.0, 0.7012),
        (50.0, 0.4385),
        (60.0, 0.3207),
        (80.0, 0.2228),
        (100.0, 0.1835),
    ]
)
_SI_DENSITY_G_CM3 = 2.33
_KEV_ANGSTROM = 12.398419843320026


def sensor_mu_per_mm(material: str, wavelength_A: float) -> float:
    """Linear attenuation coefficient (1/mm) of the sensor, for the parallax correction.

    Only silicon is tabulated; other materials return 0 (no parallax correction),
    which costs well under a pixel of accuracy for spot finding.
    """
    if material.strip().lower() not in ("si", "silicon") or not wavelength_A > 0:
        return 0.0
    energy_kev = _KEV_ANGSTROM / wavelength_A
    log_e, log_mu = np.log(_SI_MU_RHO[:, 0]), np.log(_SI_MU_RHO[:, 1])
    mu_rho = float(np.exp(np.interp(np.log(energy_kev), log_e, log_mu)))
    return mu_rho * _SI_DENSITY_G_CM3 / 10.0
