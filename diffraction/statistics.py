"""DIALS's per-image analysis statistics from a list of spots.

Reproduces ``dials.algorithms.spot_finding.per_image_analysis``:
spot counts (total, outside ice rings, beyond 4 Å), the summed intensity of
non-ice spots, the I/sigma(I) falloff resolution estimate, and the two DISTL
resolution methods (Zhang et al., J. Appl. Cryst. 2006, 39, 112) with their
noisiness. Sums, sorts (stable), tie-breaks (first maximum) and the scitbx
linear regression follow DIALS so the published figures are reproduced.

DIALS reports ``-1`` where a figure is undefined (10 or fewer non-ice spots,
no spot below the fitted line); :class:`PerImageStatistics` uses ``None``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

from beamstream.diffraction.image import DetectorGeometry
from beamstream.diffraction.resolution import spot_rlp_norm

# Hexagonal ice Ih, P 6_3/m m c, as DIALS's ice_rings_selection uses it.
ICE_CELL_A = 4.498
ICE_CELL_C = 7.338
DEFAULT_ICE_RING_WIDTH = 0.004  # full width in d*^2 (1/Å^2)
@dataclass(frozen=True)
class PerImageStatistics:
    """The nine per-image-analysis figures; ``None`` where DIALS reports -1."""

    n_spots_total: int = 0
    n_spots_no_ice: int = 0
    n_spots_4A: int = 0
    total_intensity: float = 0.0
    estimated_d_min: float | None = None
    d_min_distl_method_1: float | None = None
    d_min_distl_method_2: float | None = None
    noisiness_method_1: float | None = None
    noisiness_method_2: float | None = None

    def to_dict(self) -> dict:
        """Plain dict with the DIALS field names."""
        return asdict(self)


#: The nine DIALS field names, in DIALS's order (derived, so they cannot drift from the class).
STAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PerImageStatistics))


# ----------------------------------------------------------------------------------------------
# Small helpers with DIALS's (scitbx's) exact arithmetic
# ----------------------------------------------------------------------------------------------


def _seq_sum(values: np.ndarray) -> float:
    """Left-to-right sum, as scitbx's ``af::sum`` (numpy's own sum is pairwise)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.cumsum(values)[-1]) if values.size else 0.0


def _first_max_index(values) -> int:
    """Index of the first maximum (scitbx ``max_index``)."""
    best = 0
    for i in range(1, len(values)):
        if values[best] < values[i]:
            best = i
    return best


def _nearest_integer(x: float) -> int:
    """libtbx ``nearest_integer``: floor(x + 0.5)."""
    return int(math.floor(x + 0.5))


def _d_star_sq_as_d(d_star_sq):
    """uctbx ``d_star_sq_as_d``: 1/sqrt(x) for x > 0, else -1."""
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d_star_sq > 0, 1.0 / np.sqrt(d_star_sq), -1.0)


def _d_as_d_star_sq(d):
    """uctbx ``d_as_d_star_sq``: 1/d^2 for d > 0, else 0."""
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(d > 0, 1.0 / (d * d), 0.0)


def linear_regression(x, y, epsilon: float = 1e-15) -> tuple[float, float]:
    """(slope, y_intercept) as scitbx's ``linear_regression`` (0, 0 when undefined)."""
    x = [float(v) for v in x]
    y = [float(v) for v in y]
    if not x:
        return 0.0, 0.0
    min_x = max_x = x[0]
    min_y = max_y = y[0]
    sum_x, sum_x2, sum_y, sum_xy = x[0], x[0] * x[0], y[0], x[0] * y[0]
    for xi, yi in zip(x[1:], y[1:], strict=True):
        min_x, max_x = min(min_x, xi), max(max_x, xi)
        min_y, max_y = min(min_y, yi), max(max_y, yi)
        sum_x += xi
        sum_x2 += xi * xi
        sum_y += yi
        sum_xy += xi * yi
    n = float(len(x))
    if min_x == max_x:
        return 0.0, 0.0
    if min_y == max_y:
        return 0.0, min_y
    dx = max(abs(min_x - sum_x / n), abs(max_x - sum_x / n))
    dy = max(abs(min_y - sum_y / n), abs(max_y - sum_y / n))
    if dx == 0:
        return 0.0, 0.0
    if dy == 0:
        return 0.0, sum_y / n
    if dx < dy * epsilon:
        return 0.0, 0.0
    d = n * sum_x2 - sum_x * sum_x
    if d == 0:
        return 0.0, 0.0
    return (n * sum_xy - sum_x * sum_y) / d, (sum_x2 * sum_y - sum_x * sum_xy) / d


# ----------------------------------------------------------------------------------------------
# Ice rings
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def ice_ring_d_star_sq(d_min: float) -> np.ndarray:
    """Sorted d*^2 of all allowed ice Ih reflections with d >= ``d_min`` (no 000)."""
    a, c = ICE_CELL_A, ICE_CELL_C
    d_star_sq_max = 1.0 / (d_min * d_min)
    h_max = int(math.ceil(2.0 * a / (math.sqrt(3.0) * d_min))) + 1
    l_max = int(math.ceil(c / d_min)) + 1
    h, k, l_ = np.meshgrid(
        np.arange(-h_max, h_max + 1), np.arange(-h_max, h_max + 1), np.arange(0, l_max + 1), indexing="ij"
    )
    h, k, l_ = h.ravel(), k.ravel(), l_.ravel()
    # Reciprocal metric of the hexagonal cell: a*^2 = 4/(3a^2), a*.b* = 2/(3a^2), c*^2 = 1/c^2.
    d_star_sq = (4.0 / 3.0) * (h * h + h * k + k * k) / (a * a) + (l_ * l_) / (c * c)
    # P 6_3/m m c extinctions: h h -2h l (and its symmetry mates) with odd l, incl. 0 0 0 l.
    special = (h == k) | (k == -2 * h) | (h == -2 * k)
    absent = special & (l_ % 2 == 1)
    keep = (d_star_sq > 0) & (d_star_sq <= d_star_sq_max) & ~absent
    return np.unique(d_star_sq[keep])


def ice_rings_selection(d_spacings: np.ndarray, width: float = DEFAULT_ICE_RING_WIDTH) -> np.ndarray | None:
    """Spots within ``width/2`` (in d*^2) of an ice ring, as DIALS's ``PowderRingFilter``.

    Returns None for an empty input, like DIALS.
    """
    d_spacings = np.asarray(d_spacings, dtype=np.float64)
    if d_spacings.size == 0:
        return None
    half_width = width / 2.0
    d_min = float(np.min(d_spacings))
    # Rings out to half a width beyond the highest-resolution spot.
    d_limit = float(_d_star_sq_as_d(_d_as_d_star_sq(d_min) + half_width))
    rings = ice_ring_d_star_sq(d_limit)
    d_star_sq = _d_as_d_star_sq(d_spacings)
    selected = np.zeros(d_spacings.size, dtype=bool)
    for ring in rings:
        selected |= np.abs(d_star_sq - ring) < half_width
    return selected


# ----------------------------------------------------------------------------------------------
# Resolution estimates
# ----------------------------------------------------------------------------------------------


def _equal_population_bins(d_star_sq: np.ndarray, target_n_per_bin=20, max_slots=20, min_slots=5):
    n_slots = len(d_star_sq) // target_n_per_bin
    n_slots = max(min(n_slots, max_slots), min_slots)
    n_per_bin = len(d_star_sq) / n_slots
    d_sorted = _d_star_sq_as_d(np.sort(d_star_sq, kind="stable"))
    bins = []
    d_max = d_sorted[0]
    for i in range(n_slots):
        d_min = d_sorted[_nearest_integer((i + 1) * n_per_bin) - 1]
        bins.append((d_min, d_max))
        d_max = d_min
    return bins


def _wilson_outliers(intensities: np.ndarray, ice: np.ndarray, p_cutoff: float = 1e-2) -> np.ndarray:
    """Iterative Wilson-statistics outlier flags (Read 1999), as DIALS."""
    e_cutoff = math.sqrt(-math.log(p_cutoff))
    kept = intensities[~ice]
    sigma_n = _seq_sum(kept) / kept.size if kept.size else 0.0
    if not sigma_n > 0:  # only for non-positive intensities, where DIALS itself would fail
        return np.zeros(intensities.size, dtype=bool)
    with np.errstate(invalid="ignore"):
        outliers = np.sqrt(intensities) / math.sqrt(sigma_n) >= e_cutoff
    if outliers.any():
        inliers = ~outliers
        outliers[inliers] = _wilson_outliers(intensities[inliers], ice[inliers], p_cutoff)
    return outliers


def _points_below_line(x: np.ndarray, y: np.ndarray, m: float, c: float) -> np.ndarray:
    """DIALS's side test against the line through (0, c) and (1, m + c)."""
    diff_x = 1.0 - 0.0
    diff_y = (m * 1 + c) - c
    side = (x - 0.0) * -diff_y + (y - c) * diff_x
    return np.copysign(1.0, side) < 0


def estimate_resolution_limit(d_star_sq, intensities, variances, ice_sel=None) -> float:
    """DIALS's I/sigma(I) falloff estimate of d_min; -1 when undefined.

    Arrays are per spot and must already exclude spots with variance <= 0.
    """
    d_star_sq = np.asarray(d_star_sq, dtype=np.float64)
    intensities = np.asarray(intensities, dtype=np.float64)
    variances = np.asarray(variances, dtype=np.float64)
    n = d_star_sq.size
    ice = np.zeros(n, dtype=bool) if ice_sel is None else np.asarray(ice_sel, dtype=bool)
    d_spacings = _d_star_sq_as_d(d_star_sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_i_over_sigi = np.log(intensities / np.sqrt(variances))

    lower_y, lower_x, upper_y, upper_x = [], [], [], []
    outliers_all = np.zeros(n, dtype=bool)
    for d_min, d_max in _equal_population_bins(d_star_sq):
        in_bin = (d_spacings < d_max) & (d_spacings >= d_min)
        if not np.any(~ice & in_bin):
            continue
        members = np.flatnonzero(in_bin)
        outliers = _wilson_outliers(intensities[members], ice[members])
        outliers_all[members] = outliers
        chosen = members[~outliers & ~ice[members]]
        log_sel = log_i_over_sigi[chosen]
        dss_sel = d_star_sq[chosen]
        perm = np.argsort(log_sel, kind="stable")
        i_lower = perm[int(math.floor(0.1 * len(perm)))]
        i_upper = perm[int(math.floor((1 - 0.1) * len(perm)))]
        lower_y.append(log_sel[i_lower])
        upper_y.append(log_sel[i_upper])
        upper_x.append(dss_sel[i_lower])
        lower_x.append(dss_sel[i_upper])

    m_upper, c_upper = linear_regression(upper_x, upper_y)
    m_lower, _ = linear_regression(lower_x, lower_y)
    if m_upper == m_lower:
        return -1.0
    inside = _points_below_line(d_star_sq, log_i_over_sigi, m_upper, c_upper) & ~outliers_all & ~ice
    if not inside.any():
        return -1.0
    return float(_d_star_sq_as_d(np.max(d_star_sq[inside])))


def estimate_resolution_limit_distl_method1(rlp_norms, variances) -> tuple[float, float]:
    """DISTL method 1 (the d*^3 curve's last kink) and its noisiness, as DIALS."""
    rlp_norms = np.asarray(rlp_norms, dtype=np.float64)
    keep = np.asarray(variances, dtype=np.float64) > 0
    rlp_norms = rlp_norms[keep]
    d_star_sq = rlp_norms * rlp_norms
    d_spacings = _d_star_sq_as_d(d_star_sq)
    d_star_cubed = np.power(rlp_norms, 3)
    n_refl = rlp_norms.size

    step = 2
    while n_refl / step > 40:
        step += 1
    # Stable descending sort of d (ties keep their input order).
    order = np.argsort(-d_spacings, kind="stable")
    picks = order[[i * step for i in range(n_refl // step)]]
    ds3 = d_star_cubed[picks]
    d_subset = d_spacings[picks]
    n = ds3.size
    if n < 5:
        return -1.0, -1.0

    slopes = (ds3[1:] - ds3[0]) / (np.arange(1, n, dtype=np.float64) - 0.0)
    skip_first = 3
    p_m = _first_max_index(slopes[skip_first:]) + 1 + skip_first

    # Distances of the points before P_m from the chord P_0 -> P_m.
    x1 = (0.0, float(ds3[0]))
    x2 = (float(p_m), float(ds3[p_m]))
    vx, vy = (x2[1] - x1[1]), -(x2[0] - x1[0])
    length = math.sqrt(0 + vx * vx + vy * vy)
    vx, vy = vx / length, vy / length
    gaps = [0.0]
    for i in range(1, p_m):
        rx, ry = x1[0] - i, x1[1] - float(ds3[i])
        gaps.append(abs(0 + vx * rx + vy * ry))
    gaps_arr = np.asarray(gaps)
    mean = _seq_sum(gaps_arr) / gaps_arr.size
    s = math.sqrt(_seq_sum((gaps_arr - mean) ** 2) / (gaps_arr.size - 1))

    p_k = _first_max_index(gaps)
    g_k = gaps[p_k]
    p_g = p_k
    for i in range(p_k + 1, len(gaps)):
        if gaps[i] > (g_k - 0.5 * s):
            p_g = i
    d_g = float(d_subset[p_g])

    noisiness = 0
    for i in range(n - 1):
        for j in range(i + 1, n - 1):
            if slopes[i] >= slopes[j]:
                noisiness += 1
    return d_g, noisiness / ((n - 1) * (n - 2) / 2)


def _d_star_cubed_bins(d_spacings: np.ndarray, target_n_per_bin=25, max_slots=40, min_slots=20):
    unique = np.unique(d_spacings)[::-1]  # descending d
    ds3 = np.power(1 / unique, 3)
    low_res_count = int(math.ceil(min(max(target_n_per_bin, 0.05 * unique.size), 0.25 * unique.size)))
    if low_res_count >= unique.size:
        return None
    bin_step = ds3[low_res_count] - ds3[0]
    if not bin_step > 0:
        return None
    n_slots = int(math.ceil((ds3[-1] - ds3[0]) / bin_step))
    n_slots = max(min(n_slots, max_slots), min_slots)
    bin_step = (ds3[-1] - ds3[0]) / n_slots
    bins = []
    ds3_max = float(ds3[0])
    for i in range(n_slots):
        ds3_min = float(ds3[0] + (i + 1) * bin_step)
        bins.append((1 / ds3_min ** (1 / 3), 1 / ds3_max ** (1 / 3)))
        ds3_max = ds3_min
    return bins


def estimate_resolution_limit_distl_method2(rlp_norms, variances) -> tuple[float, float]:
    """DISTL method 2 (spot-count falloff in d*^3 shells) and its noisiness, as DIALS."""
    rlp_norms = np.asarray(rlp_norms, dtype=np.float64)
    keep = np.asarray(variances, dtype=np.float64) > 0
    d_spacings = _d_star_sq_as_d(rlp_norms[keep] * rlp_norms[keep])
    bins = _d_star_cubed_bins(d_spacings)
    if bins is None:
        return -1.0, -1.0
    counts = [int(np.count_nonzero((d_spacings < d_max) & (d_spacings >= d_min))) for d_min, d_max in bins]
    t0 = (counts[0] + counts[1]) / 2
    mu = 0.15
    i = 0
    for i in range(len(counts) - 1):
        if counts[i] < mu * t0 and counts[i + 1] < mu * t0:
            break
    d_min = float(bins[i][0])
    m = len(counts)
    noisiness = 0
    for a in range(m):
        for b in range(a + 1, m):
            if counts[a] <= counts[b]:
                noisiness += 1
    return d_min, noisiness / (0.5 * m * (m - 1))


# ----------------------------------------------------------------------------------------------
# Per-image statistics
# ----------------------------------------------------------------------------------------------


def _none_if_negative(value: float) -> float | None:
    return None if value is None or value < 0 else float(value)


def stats_for_spots(
    rlp_norms,
    intensities,
    variances,
    *,
    resolution_analysis: bool = True,
    filter_ice: bool = True,
    ice_rings_width: float = DEFAULT_ICE_RING_WIDTH,
) -> PerImageStatistics:
    """DIALS ``stats_for_reflection_table`` on per-spot arrays (|s1 - s0|, I, var(I))."""
    rlp_norms = np.asarray(rlp_norms, dtype=np.float64)
    intensities = np.asarray(intensities, dtype=np.float64)
    variances = np.asarray(variances, dtype=np.float64)
    keep = rlp_norms > 0
    rlp_norms, intensities, variances = rlp_norms[keep], intensities[keep], variances[keep]
    d_star_sq = rlp_norms * rlp_norms
    d_spacings = _d_star_sq_as_d(d_star_sq)

    ice_sel = None
    if rlp_norms.size and filter_ice:
        ice_sel = ice_rings_selection(d_spacings, width=ice_rings_width)
    no_ice = np.ones(rlp_norms.size, dtype=bool) if ice_sel is None else ~ice_sel
    n_spots_total = int(rlp_norms.size)
    n_spots_no_ice = int(np.count_nonzero(no_ice))
    n_spots_4a = int(np.count_nonzero(d_spacings > 4))
    total_intensity = _seq_sum(intensities[no_ice])

    estimated = distl1 = distl2 = noise1 = noise2 = -1.0
    if resolution_analysis and n_spots_no_ice > 10:
        # DIALS drops spots without a positive variance inside each estimator.
        positive = variances > 0
        ice_pos = None if ice_sel is None else ice_sel[positive]
        estimated = estimate_resolution_limit(
            d_star_sq[positive], intensities[positive], variances[positive], ice_sel=ice_pos
        )
        distl1, noise1 = estimate_resolution_limit_distl_method1(rlp_norms, variances)
        distl2, noise2 = estimate_resolution_limit_distl_method2(rlp_norms, variances)

    return PerImageStatistics(
        n_spots_total=n_spots_total,
        n_spots_no_ice=n_spots_no_ice,
        n_spots_4A=n_spots_4a,
        total_intensity=float(total_intensity),
        estimated_d_min=_none_if_negative(estimated),
        d_min_distl_method_1=_none_if_negative(distl1),
        d_min_distl_method_2=_none_if_negative(distl2),
        noisiness_method_1=_none_if_negative(noise1),
        noisiness_method_2=_none_if_negative(noise2),
    )


def statistics_from_spots(
    spots: np.ndarray,
    geometry: DetectorGeometry,
    *,
    resolution_analysis: bool = True,
    filter_ice: bool = True,
    ice_rings_width: float = DEFAULT_ICE_RING_WIDTH,
    d_min: float | None = None,
    d_max: float | None = None,
) -> PerImageStatistics:
    """Per-image statistics of a spot array (fields ``x_px, y_px, intensity`` and optionally ``variance``).

    ``d_min`` / ``d_max`` drop spots whose centroid lies outside the range (a
    spot-level version of DIALS's pixel resolution filter, for spot lists that
    were found without it). Without a ``variance`` field DIALS's strong-spot
    variance ``|intensity|`` is used.
    """
    spots = np.asarray(spots)
    if spots.size == 0:
        return PerImageStatistics()
    norms = spot_rlp_norm(geometry, spots["x_px"], spots["y_px"])
    intensities = np.asarray(spots["intensity"], dtype=np.float64)
    names = spots.dtype.names or ()
    variances = (
        np.asarray(spots["variance"], dtype=np.float64) if "variance" in names else np.abs(intensities)
    )
    if d_min is not None or d_max is not None:
        d = _d_star_sq_as_d(norms * norms)
        keep = np.ones(d.size, dtype=bool)
        if d_min is not None:
            keep &= d > d_min
        if d_max is not None:
            keep &= d < d_max
        norms, intensities, variances = norms[keep], intensities[keep], variances[keep]
    return stats_for_spots(
        norms,
        intensities,
        variances,
        resolution_analysis=resolution_analysis,
        filter_ice=filter_ice,
        ice_rings_width=ice_rings_width,
    )
