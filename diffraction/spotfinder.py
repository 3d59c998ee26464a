"""Strong pixels to spots, as DIALS's 2-D (stills / per-image) spot finder does it.

What DIALS does, and so what this module reproduces:

* strong pixels are grouped by **4-connectivity** (``PixelListLabeller.labels_2d``
  links a pixel to its right and lower neighbours only);
* spots are numbered by their first pixel in raster (row-major) order, which is
  the order boost's connected components gives them;
* spots with fewer than ``min_spot_size`` or more than ``max_spot_size``
  pixels are dropped (both bounds inclusive); DIALS's ``Auto`` minimum is 3 for
  pixel-array detectors;
* the centroid is the intensity-weighted mean of pixel centres (``index + 0.5``)
  of the spot's pixels, computed from float32 pixel values as DIALS's shoeboxes
  hold them: the weight total accumulates in float32, the weighted coordinates
  in float64 relative to the bounding box, in raster order;
* the intensity is the float32 sum of the raw counts (no background is
  subtracted: strong-spot shoeboxes have a zero background) and its variance is
  ``|intensity|``;
* spots whose brightest pixel centre (first maximum in raster order) lies more
  than ``max_separation`` pixels from the centroid are dropped.

Coordinates are (x = fast, y = slow) pixels; ``bbox`` is DIALS's
``(x0, x1, y0, y1)`` with exclusive upper bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from beamstream.diffraction.errors import SpotFindingError, SpotFindingParameterError

try:
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

SPOT_DTYPE = np.dtype(
    [
        ("x_px", np.float64),
        ("y_px", np.float64),
        ("intensity", np.float64),
        ("variance", np.float64),
        ("n_pixels", np.int32),
        ("bbox", np.int32, (4,)),
    ]
)

LabelBackend = Literal["numba", "numpy"]


@dataclass(frozen=True)
class SpotFilterParams:
    """DIALS's spot filter defaults for pixel-array detectors."""

    min_spot_size: int = 3
    max_spot_size: int = 1000
    max_separation: float | None = 2.0
    max_strong_pixel_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.min_spot_size < 1:
            raise SpotFindingParameterError(f"min_spot_size must be >= 1, got {self.min_spot_size}")
        if self.max_spot_size <= self.min_spot_size:
            # DIALS asserts max_pixels > min_pixels in its shoebox creator.
            raise SpotFindingParameterError(
                f"max_spot_size ({self.max_spot_size}) must exceed min_spot_size ({self.min_spot_size})"
            )
        if self.max_separation is not None and not self.max_separation >= 0:
            raise SpotFindingParameterError(f"max_separation must be >= 0, got {self.max_separation!r}")
        if not 0 <= self.max_strong_pixel_fraction <= 1:
            raise SpotFindingParameterError(
                f"max_strong_pixel_fraction must be in [0, 1], got {self.max_strong_pixel_fraction!r}"
            )


def empty_spots() -> np.ndarray:
    """A zero-length spot array."""
    return np.zeros(0, dtype=SPOT_DTYPE)


def check_strong_pixel_fraction(n_strong: int, n_pixels: int, fraction: float) -> None:
    """Raise :class:`SpotFindingError` where DIALS refuses a frame for too many strong pixels."""
    if fraction < 1:
        max_strong = int(math.ceil(fraction * n_pixels))
        if n_strong > max_strong:
            raise SpotFindingError(
                f"{n_strong} strong pixels exceed the maximum of {max_strong} "
                f"(max_strong_pixel_fraction={fraction}); the frame is not usable for spot finding"
            )


def find_spots(
    data: np.ndarray,
    strong: np.ndarray,
    params: SpotFilterParams | None = None,
    *,
    backend: LabelBackend = "numba",
) -> np.ndarray:
    """Group strong pixels into spots and return them as a :data:`SPOT_DTYPE` array.

    ``data`` holds the counts the spot values are taken from, ``strong`` the
    boolean strong-pixel mask (e.g. from :func:`diffraction.threshold.threshold_image`).
    Raises :class:`SpotFindingError` when the strong pixels exceed
    ``max_strong_pixel_fraction`` of the frame, as DIALS does.
    """
    params = params or SpotFilterParams()
    data = np.asarray(data)
    strong = np.asarray(strong, dtype=bool)
    if data.shape != strong.shape or data.ndim != 2:
        raise SpotFindingParameterError(f"data {data.shape} and strong mask {strong.shape} must be equal 2-D shapes")
    index = np.flatnonzero(strong)
    check_strong_pixel_fraction(index.size, strong.size, params.max_strong_pixel_fraction)
    if index.size == 0:
        return empty_spots()
    width = strong.shape[1]
    # DIALS's pixel lists hold doubles and its shoeboxes float32: round values the same way.
    values = data.ravel()[index].astype(np.float64).astype(np.float32)
    if backend == "numba" and HAVE_NUMBA:
        labels, n_labels = _label_numba(index, width)
        spots = _measure_numba(index, values, labels, n_labels, width)
    else:
        labels, n_labels = label_pixels_numpy(index, width)
        spots = measure_spots_numpy(index, values, labels, n_labels, width)
    return _filter(spots, params)


def _filter(spots: np.ndarray, params: SpotFilterParams) -> np.ndarray:
    """Apply DIALS's size filter, then its peak-centroid distance filter."""
    n = spots["n_pixels"]
    keep = (n >= params.min_spot_size) & (n <= params.max_spot_size)
    if params.max_separation is not None:
        dx = spots["peak_x"] - spots["x_px"]
        dy = spots["peak_y"] - spots["y_px"]
        # DIALS measures a 3-vector whose z difference is 0 on a single image.
        distance = np.sqrt(dx * dx + dy * dy + 0.0)
        keep &= distance <= params.max_separation
    kept = spots[keep]
    out = np.zeros(kept.size, dtype=SPOT_DTYPE)
    for name in SPOT_DTYPE.names:
        out[name] = kept[name]
    return out


# Working array with the peak position, which the public dtype does not carry.
_WORK_DTYPE = np.dtype(SPOT_DTYPE.descr + [("peak_x", np.float64), ("peak_y", np.float64)])


# ----------------------------------------------------------------------------------------------
# numpy implementation (fallback and cross-check)
# ----------------------------------------------------------------------------------------------


def label_pixels_numpy(index: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """4-connected labels of the strong pixels at sorted flat ``index``; labels follow first-pixel order."""
    n = index.size
    position = np.arange(n)
    # Right neighbours: next strong pixel is adjacent in the same row.
    right = np.flatnonzero((index[1:] == index[:-1] + 1) & ((index[:-1] % width) != width - 1))
    edges_a = [right]
    edges_b = [right + 1]
    # Lower neighbours: look the pixel one row down up in the sorted list.
    below = np.searchsorted(index, index + width)
    below_ok = below < n
    below_ok[below_ok] = index[below[below_ok]] == index[below_ok] + width
    edges_a.append(position[below_ok])
    edges_b.append(below[below_ok])
    a = np.concatenate(edges_a)
    b = np.concatenate(edges_b)
    parent = position.copy()
    # Hook larger roots under smaller ones and compress until every edge joins equal roots;
    # roots only ever decrease, so each component ends rooted at its first pixel.
    while a.size:
        pa = parent[a]
        pb = parent[b]
        differ = pa != pb
        if not differ.any():
            break
        lo = np.minimum(pa[differ], pb[differ])
        hi = np.maximum(pa[differ], pb[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    roots = parent
    is_root = roots == position
    label_of_root = np.cumsum(is_root) - 1
    return label_of_root[roots].astype(np.int64), int(is_root.sum())


def measure_spots_numpy(
    index: np.ndarray, values: np.ndarray, labels: np.ndarray, n_labels: int, width: int
) -> np.ndarray:
    """Size, bbox, float32 intensity, centroid and peak of each label (numpy version)."""
    xs = (index % width).astype(np.int64)
    ys = (index // width).astype(np.int64)
    out = np.zeros(n_labels, dtype=_WORK_DTYPE)
    out["n_pixels"] = np.bincount(labels, minlength=n_labels)
    x0 = np.full(n_labels, np.iinfo(np.int64).max)
    y0 = np.full(n_labels, np.iinfo(np.int64).max)
    x1 = np.full(n_labels, -1)
    y1 = np.full(n_labels, -1)
    np.minimum.at(x0, labels, xs)
    np.minimum.at(y0, labels, ys)
    np.maximum.at(x1, labels, xs + 1)
    np.maximum.at(y1, labels, ys + 1)
    out["bbox"] = np.stack([x0, x1, y0, y1], axis=1)
    # Sequential float32 accumulation in raster order, as DIALS's float shoebox sums.
    total = np.zeros(n_labels, dtype=np.float32)
    np.add.at(total, labels, values)
    weights = values.astype(np.float64)
    sum_x = np.zeros(n_labels)
    sum_y = np.zeros(n_labels)
    np.add.at(sum_x, labels, weights * ((xs - x0[labels]) + 0.5))
    np.add.at(sum_y, labels, weights * ((ys - y0[labels]) + 0.5))
    total64 = total.astype(np.float64)
    positive = total64 > 0
    safe = np.where(positive, total64, 1.0)
    out["x_px"] = np.where(positive, sum_x / safe + x0, (x1 + x0) / 2.0)
    out["y_px"] = np.where(positive, sum_y / safe + y0, (y1 + y0) / 2.0)
    out["intensity"] = total64
    out["variance"] = np.abs(total).astype(np.float64)
    # Peak: first maximum in raster order (stable sort on descending value).
    order = np.lexsort((np.arange(labels.size), -values, labels))
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    out["peak_x"] = xs[first] + 0.5
    out["peak_y"] = ys[first] + 0.5
    return out


# ----------------------------------------------------------------------------------------------
# numba implementation
# ----------------------------------------------------------------------------------------------

if HAVE_NUMBA:

    @njit(cache=True, nogil=True)
    def _find_root(parent, p):
        root = p
        while parent[root] != root:
            root = parent[root]
        while parent[p] != root:  # path compression
            nxt = parent[p]
            parent[p] = root
            p = nxt
        return root

    @njit(cache=True, nogil=True)
    def _union(parent, p, q):
        rp = _find_root(parent, p)
        rq = _find_root(parent, q)
        if rp < rq:
            parent[rq] = rp
        elif rq < rp:
            parent[rp] = rq

    @njit(cache=True, nogil=True)
    def _label_kernel(index, width, labels):
        n = index.size
        parent = np.arange(n)
        below = 0
        for p in range(n):
            k = index[p]
            if p + 1 < n and index[p + 1] == k + 1 and (k % width) != width - 1:
                _union(parent, p, p + 1)
            target = k + width
            while below < n and index[below] < target:
                below += 1
            if below < n and index[below] == target:
                _union(parent, p, below)
        n_labels = 0
        for p in range(n):
            root = _find_root(parent, p)
            if root == p:
                labels[p] = n_labels
                n_labels += 1
            else:
                labels[p] = labels[root]  # roots precede their members
        return n_labels

    @njit(cache=True, nogil=True)
    def _measure_kernel(index, values, labels, n_labels, width, n_pixels, bbox, total, sum_x, sum_y,
                        peak, peak_value):
        for p in range(index.size):
            lab = labels[p]
            x = index[p] % width
            y = index[p] // width
            if n_pixels[lab] == 0:
                bbox[lab, 0] = x
                bbox[lab, 1] = x + 1
                bbox[lab, 2] = y
                bbox[lab, 3] = y + 1
                peak[lab] = p
                peak_value[lab] = values[p]
            else:
                if x < bbox[lab, 0]:
                    bbox[lab, 0] = x
                if x + 1 > bbox[lab, 1]:
                    bbox[lab, 1] = x + 1
                if y + 1 > bbox[lab, 3]:
                    bbox[lab, 3] = y + 1
                if values[p] > peak_value[lab]:
                    peak[lab] = p
                    peak_value[lab] = values[p]
            n_pixels[lab] += 1
            total[lab] += values[p]
        for p in range(index.size):
            lab = labels[p]
            w = np.float64(values[p])
            sum_x[lab] += w * ((index[p] % width - bbox[lab, 0]) + 0.5)
            sum_y[lab] += w * ((index[p] // width - bbox[lab, 2]) + 0.5)


def _label_numba(index: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    labels = np.empty(index.size, dtype=np.int64)
    n_labels = _label_kernel(index.astype(np.int64), np.int64(width), labels)
    return labels, int(n_labels)


def _measure_numba(
    index: np.ndarray, values: np.ndarray, labels: np.ndarray, n_labels: int, width: int
) -> np.ndarray:
    n_pixels = np.zeros(n_labels, dtype=np.int64)
    bbox = np.zeros((n_labels, 4), dtype=np.int64)
    total = np.zeros(n_labels, dtype=np.float32)
    sum_x = np.zeros(n_labels)
    sum_y = np.zeros(n_labels)
    peak = np.zeros(n_labels, dtype=np.int64)
    peak_value = np.zeros(n_labels, dtype=np.float32)
    index = index.astype(np.int64)
    _measure_kernel(index, values, labels, n_labels, np.int64(width), n_pixels, bbox, total, sum_x, sum_y,
                    peak, peak_value)
    out = np.zeros(n_labels, dtype=_WORK_DTYPE)
    out["n_pixels"] = n_pixels
    out["bbox"] = bbox
    total64 = total.astype(np.float64)
    positive = total64 > 0
    safe = np.where(positive, total64, 1.0)
    x0, x1, y0, y1 = bbox[:, 0], bbox[:, 1], bbox[:, 2], bbox[:, 3]
    out["x_px"] = np.where(positive, sum_x / safe + x0, (x1 + x0) / 2.0)
    out["y_px"] = np.where(positive, sum_y / safe + y0, (y1 + y0) / 2.0)
    out["intensity"] = total64
    out["variance"] = np.abs(total).astype(np.float64)
    out["peak_x"] = index[peak] % width + 0.5
    out["peak_y"] = index[peak] // width + 0.5
    return out
