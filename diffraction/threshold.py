"""DIALS's ``dispersion`` and ``dispersion_extended`` strong-pixel thresholds.

Both decide, pixel by pixel, whether a count stands out from its local
neighbourhood, using the index of dispersion (variance / mean) of a
``(2*ky+1) x (2*kx+1)`` window (7x7 with DIALS's default ``kernel_size=(3, 3)``).
The arithmetic follows DIALS's ``local.h`` operation for operation, so that the
masks are bit-identical:

* window sums include a pixel only if it is valid (mask True) *and* below
  2**24 counts;
* ``dispersion``: a valid pixel with ``m >= min_local`` window pixels, a
  non-negative window sum ``x`` and ``value > global_threshold`` is strong when
  ``m*y - x*x - x*(m-1) > x*sigma_b*sqrt(2(m-1))`` *and*
  ``m*value - x > sigma_s*sqrt(x*m)`` (both strict);
* ``dispersion_extended`` (DIALS's default): the first test alone marks
  "not background" (masked pixels count as not background too); that region is
  eroded (a pixel survives if no background pixel lies within Chebyshev distance
  ``min(kernel_size) - 1``); surviving pixels are strong when
  ``value > global_threshold`` and ``value >= mean + sigma_s*sqrt(mean)``
  (non-strict), where ``mean`` is the mean of the *background* pixels in a
  window two pixels wider (``mean = 0`` with fewer than two of them).

Two backends give identical masks:

* ``numba``: streaming window sums in exact 64-bit integers (no summed-area
  table, so memory stays at a few bytes per pixel) and the final test only at
  candidate pixels. Exact integer sums equal DIALS's double-precision
  summed-area-table sums whenever those are exact, i.e. for integer counts (all
  real detector frames). Non-integral float frames fall back to the numpy path.
* ``numpy``: DIALS's own summed-area tables in float64, built in DIALS's
  summation order (row prefix sums accumulated down the columns) and corner
  arithmetic in DIALS's order, so it matches DIALS even for float data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from beamstream.diffraction.errors import SpotFindingParameterError

logger = logging.getLogger(__name__)

try:  # numba is a hard dependency, but a broken install must not take spot finding down
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None
    HAVE_NUMBA = False

ThresholdAlgorithm = Literal["dispersion", "dispersion_extended"]
ThresholdBackend = Literal["numba", "numpy"]

ALGORITHMS: tuple[str, ...] = ("dispersion", "dispersion_extended")
BACKENDS: tuple[str, ...] = ("numba", "numpy")

# DIALS leaves pixels at or above 2**24 counts out of the window sums.
BIG = 1 << 24
# Fast integer path: valid pixels must be > -2**24 so squared sums cannot overflow int64.
_MIN_EXACT = -(1 << 24)


@dataclass(frozen=True)
class ThresholdParams:
    """Parameters of the dispersion thresholds, with DIALS's defaults.

    ``kernel_size`` is the half-size (slow, fast) of the local window, as DIALS's
    ``kernel_size`` (index 0 applies to rows, index 1 to columns). ``gain=None``
    is DIALS's default code path (no gain map); any number, even 1.0, selects
    DIALS's gain-map formulas, which differ in rounding.
    ``min_local <= 0`` means "the whole window", as in DIALS.
    """

    kernel_size: tuple[int, int] = (3, 3)
    gain: float | None = None
    sigma_background: float = 6.0
    sigma_strong: float = 3.0
    min_local: int = 2
    global_threshold: float = 0.0

    def __post_init__(self) -> None:
        ky, kx = self.kernel_size
        if int(ky) != ky or int(kx) != kx or ky < 1 or kx < 1:
            raise SpotFindingParameterError(f"kernel_size must be two positive integers, got {self.kernel_size!r}")
        if not (self.sigma_background >= 0 and self.sigma_strong >= 0):
            raise SpotFindingParameterError(
                f"sigma_background and sigma_strong must be >= 0, got "
                f"{self.sigma_background!r}, {self.sigma_strong!r}"
            )
        if not self.global_threshold >= 0:
            raise SpotFindingParameterError(f"global_threshold must be >= 0, got {self.global_threshold!r}")
        if self.gain is not None and not self.gain > 0:
            raise SpotFindingParameterError(f"gain must be > 0, got {self.gain!r}")
        if self.min_local > 0 and not 1 < self.min_local <= self.num_kernel:
            raise SpotFindingParameterError(
                f"min_local must be in 2..{self.num_kernel} (or <= 0 for the whole window), got {self.min_local}"
            )

    @property
    def num_kernel(self) -> int:
        """Number of pixels in the full local window."""
        ky, kx = self.kernel_size
        return (2 * int(ky) + 1) * (2 * int(kx) + 1)

    @property
    def min_count(self) -> int:
        """The minimum number of valid window pixels, after DIALS's ``<= 0`` rule."""
        return self.num_kernel if self.min_local <= 0 else int(self.min_local)

    @property
    def erosion_distance(self) -> int:
        """Chebyshev distance from background that a dispersion_extended strong pixel needs."""
        return int(min(self.kernel_size))


def threshold_image(
    data: np.ndarray,
    mask: np.ndarray,
    params: ThresholdParams | None = None,
    *,
    algorithm: ThresholdAlgorithm = "dispersion_extended",
    backend: ThresholdBackend = "numba",
) -> np.ndarray:
    """Return the boolean strong-pixel mask of one frame, as DIALS computes it.

    ``data`` is a 2-D (slow, fast) array of counts (any integer or float dtype),
    ``mask`` a same-shaped boolean array, True where a pixel may be used.
    """
    params = params or ThresholdParams()
    if algorithm not in ALGORITHMS:
        raise SpotFindingParameterError(f"unknown threshold algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if backend not in BACKENDS:
        raise SpotFindingParameterError(f"unknown threshold backend {backend!r}; choose one of {BACKENDS}")
    data = np.asarray(data)
    mask = np.asarray(mask, dtype=bool)
    if data.ndim != 2 or data.shape != mask.shape:
        raise SpotFindingParameterError(f"data {data.shape} and mask {mask.shape} must be equal 2-D shapes")
    if data.dtype.kind not in "iuf" and data.dtype != np.bool_:
        raise SpotFindingParameterError(f"image data must be numeric, got dtype {data.dtype}")
    if data.size == 0:
        return np.zeros(data.shape, dtype=bool)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if not data.dtype.isnative:  # e.g. big-endian HDF5 data; the kernels need native order
        data = data.astype(data.dtype.newbyteorder("="))

    if backend == "numba" and not HAVE_NUMBA:  # pragma: no cover
        logger.warning("numba is not importable; using the numpy threshold backend")
        backend = "numpy"
    exact = _as_exact_integers(data, mask) if backend == "numba" else None
    if exact is not None:
        from beamstream.diffraction import _threshold_numba as kernels

        exact = np.ascontiguousarray(exact)
        mask = np.ascontiguousarray(mask)
        if algorithm == "dispersion":
            return kernels.dispersion(exact, mask, params)
        return kernels.dispersion_extended(exact, mask, params)
    if algorithm == "dispersion":
        return _dispersion_numpy(data, mask, params)
    return _dispersion_extended_numpy(data, mask, params)


def _as_exact_integers(data: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Integer data for the numba kernels, or None when their exact-integer sums would not apply.

    Valid pixels must be integers > -2**24 (so squared window sums fit int64).
    Integral float frames are converted (values of masked pixels never matter).
    """
    if data.dtype.kind == "u":
        return data
    if data.dtype.kind == "i":
        if data.dtype.itemsize <= 2 or int(data.min()) > _MIN_EXACT or bool(np.all(data[mask] > _MIN_EXACT)):
            return data
        return None
    valid = data[mask]
    if valid.size and not (
        np.all(valid > _MIN_EXACT) and np.all(valid < 2**31) and np.all(np.floor(valid) == valid)
    ):
        return None
    return np.where(mask, data, 0).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# numpy backend: DIALS's summed-area tables, same summation order, same corner arithmetic.
# ----------------------------------------------------------------------------------------------

_ROW_CHUNK = 256  # output rows per step; bounds the band of table rows and the gather temporaries


class _BandedTables:
    """DIALS's summed-area tables (count, sum, sum of squares), held a band of rows at a time.

    Padded with a zero first row and column: padded row ``p`` is the table
    row of image row ``p - 1``. Rows are built as DIALS builds them (prefix
    sums along the row, then each table row = previous table row + row
    prefix, sequentially), so float sums round exactly as DIALS's do, but
    only the rows the current output chunk needs stay in memory.
    """

    def __init__(self, data: np.ndarray, allowed: np.ndarray, want_y: bool) -> None:
        self.data = data
        self.allowed = allowed
        self.want_y = want_y
        width = data.shape[1]
        self.start = 0
        self.m = np.zeros((1, width + 1), dtype=np.int32)
        self.x = np.zeros((1, width + 1), dtype=np.float64)
        self.y = np.zeros((1, width + 1), dtype=np.float64) if want_y else None

    def _grow(self, table: np.ndarray, row_values: np.ndarray, dtype) -> np.ndarray:
        n = row_values.shape[0]
        block = np.zeros((n + 1, table.shape[1]), dtype=dtype)
        block[0] = table[-1]
        np.cumsum(row_values, axis=1, dtype=dtype, out=block[1:, 1:])
        np.add.accumulate(block, axis=0, out=block)  # previous row + row prefix, in order
        return np.concatenate([table, block[1:]])

    def ensure(self, lo: int, hi: int) -> None:
        """Hold padded rows ``lo`` .. ``hi - 1`` (``lo`` never decreases between calls)."""
        while self.start + self.m.shape[0] < hi:
            end = self.start + self.m.shape[0]
            rows = slice(end - 1, min(hi, end + _ROW_CHUNK) - 1)
            src = self.data[rows].astype(np.float64)
            with np.errstate(invalid="ignore"):
                use = self.allowed[rows] & (src < BIG)
            values = np.where(use, src, 0.0)
            self.m = self._grow(self.m, use, np.int32)
            self.x = self._grow(self.x, values, np.float64)
            if self.want_y:
                np.multiply(values, values, out=values)
                self.y = self._grow(self.y, values, np.float64)
            # Keep the last row: the next rows are accumulated onto it.
            self._drop(min(lo, self.start + self.m.shape[0] - 1))
        self._drop(lo)

    def _drop(self, lo: int) -> None:
        if lo > self.start:
            drop = lo - self.start
            self.m, self.x = self.m[drop:], self.x[drop:]
            if self.want_y:
                self.y = self.y[drop:]
            self.start = lo


def _window_bounds(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded-table indices (start, stop) of the window [i-k, i+k] clipped to [0, n-1]."""
    idx = np.arange(n)
    return np.maximum(idx - k, 0), np.minimum(idx + k, n - 1) + 1


def _box(table: np.ndarray, r0: np.ndarray, r1: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Window sums for a block of rows, in DIALS's order: (d00 - (d10 + d01)) + d11.

    Where the window touches the top or left edge the padded zero row/column
    stands in for the corners DIALS skips, which gives the same roundings.
    """
    top = table[r0]
    bottom = table[r1]
    return (top[:, c0] - (bottom[:, c0] + top[:, c1])) + bottom[:, c1]


def _box_at(table: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
    """Window sums at scattered pixels (index arrays), same arithmetic as :func:`_box`."""
    return (table[r0, c0] - (table[r1, c0] + table[r0, c1])) + table[r1, c1]


def _dispersion_test(m, x, y, params: ThresholdParams) -> np.ndarray:
    """DIALS's index-of-dispersion test ``a > c`` on window sums (float64 arrays)."""
    nsig_b = params.sigma_background
    with np.errstate(invalid="ignore"):
        root = np.sqrt(2 * (m - 1))
        if params.gain is None:
            a = m * y - x * x - x * (m - 1)
            c = x * nsig_b * root
        else:
            a = m * y - x * x
            c = params.gain * x * (m - 1 + nsig_b * root)
        return a > c


def _first_pass_chunks(data: np.ndarray, mask: np.ndarray, params: ThresholdParams):
    """Yield (rows, m, x, y) window sums of the first pass, chunk by chunk of output rows."""
    height, width = data.shape
    ky, kx = (int(k) for k in params.kernel_size)
    r0_all, r1_all = _window_bounds(height, ky)
    c0, c1 = _window_bounds(width, kx)
    tables = _BandedTables(data, mask, want_y=True)
    for start in range(0, height, _ROW_CHUNK):
        rows = slice(start, min(start + _ROW_CHUNK, height))
        r0, r1 = r0_all[rows], r1_all[rows]
        tables.ensure(int(r0[0]), int(r1[-1]) + 1)
        r0, r1 = r0 - tables.start, r1 - tables.start
        m = _box(tables.m, r0, r1, c0, c1).astype(np.float64)
        yield rows, m, _box(tables.x, r0, r1, c0, c1), _box(tables.y, r0, r1, c0, c1)


def _dispersion_numpy(data: np.ndarray, mask: np.ndarray, params: ThresholdParams) -> np.ndarray:
    out = np.zeros(data.shape, dtype=bool)
    for rows, m, x, y in _first_pass_chunks(data, mask, params):
        value = data[rows].astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = mask[rows] & (m >= params.min_count) & (x >= 0) & (value > params.global_threshold)
            ok &= _dispersion_test(m, x, y, params)
            scale = x * m if params.gain is None else params.gain * x * m
            ok &= (m * value - x) > params.sigma_strong * np.sqrt(scale)
        out[rows] = ok
    return out


def erode_not_background(not_background: np.ndarray, distance: int) -> np.ndarray:
    """Pixels whose Chebyshev distance to the nearest background pixel is >= ``distance``.

    Equivalent to DIALS's two-pass chessboard distance transform followed by
    ``distance >= erosion_distance``: a pixel survives when every pixel within
    Chebyshev radius ``distance - 1`` (clipped to the image) is not background.
    """
    radius = distance - 1
    if radius <= 0:
        return not_background.copy()
    height, width = not_background.shape
    across = not_background.copy()
    for shift in range(1, radius + 1):  # AND with the neighbours left and right, edges clipped
        across[:, shift:] &= not_background[:, :-shift]
        across[:, :-shift] &= not_background[:, shift:]
    core = across.copy()
    for shift in range(1, radius + 1):
        core[shift:] &= across[:-shift]
        core[:-shift] &= across[shift:]
    return core


def _dispersion_extended_numpy(data: np.ndarray, mask: np.ndarray, params: ThresholdParams) -> np.ndarray:
    height, width = data.shape
    ky, kx = (int(k) for k in params.kernel_size)

    # Pass 1: the dispersion test alone; masked pixels count as "not background".
    not_background = ~mask
    for rows, m, x, y in _first_pass_chunks(data, mask, params):
        with np.errstate(invalid="ignore"):
            not_background[rows] |= (m >= params.min_count) & (x >= 0) & _dispersion_test(m, x, y, params)

    # Erosion, then the background mask for the second pass.
    core = erode_not_background(not_background, params.erosion_distance)
    del not_background
    with np.errstate(invalid="ignore"):
        cand_j, cand_i = np.nonzero(core & mask & (data > params.global_threshold))
    background = mask & ~core
    del core
    out = np.zeros(data.shape, dtype=bool)

    # Pass 2: mean of the background in a window two pixels wider, at the candidates only.
    r0_all, r1_all = _window_bounds(height, ky + 2)
    c0_all, c1_all = _window_bounds(width, kx + 2)
    tables = _BandedTables(data, background, want_y=False)
    bounds = np.searchsorted(cand_j, np.arange(0, height + _ROW_CHUNK, _ROW_CHUNK))
    for first, last in zip(bounds[:-1], bounds[1:], strict=True):
        if first == last:
            continue
        j, i = cand_j[first:last], cand_i[first:last]
        r0, r1 = r0_all[j], r1_all[j]
        tables.ensure(int(r0.min()), int(r1.max()) + 1)
        r0, r1 = r0 - tables.start, r1 - tables.start
        c0, c1 = c0_all[i], c1_all[i]
        m = _box_at(tables.m, r0, r1, c0, c1).astype(np.float64)
        x = _box_at(tables.x, r0, r1, c0, c1)
        value = data[j, i].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(m >= 2, x / np.where(m >= 2, m, 1.0), 0.0)
            spread = mean if params.gain is None else params.gain * mean
            out[j, i] = (x >= 0) & (value >= mean + params.sigma_strong * np.sqrt(spread))
    return out


def dispersion_mask(data: np.ndarray, mask: np.ndarray, params: ThresholdParams | None = None,
                    backend: ThresholdBackend = "numba") -> np.ndarray:
    """DIALS ``dispersion`` strong-pixel mask (see :func:`threshold_image`)."""
    return threshold_image(data, mask, params, algorithm="dispersion", backend=backend)


def dispersion_extended_mask(data: np.ndarray, mask: np.ndarray, params: ThresholdParams | None = None,
                             backend: ThresholdBackend = "numba") -> np.ndarray:
    """DIALS ``dispersion_extended`` strong-pixel mask (see :func:`threshold_image`)."""
    return threshold_image(data, mask, params, algorithm="dispersion_extended", backend=backend)
