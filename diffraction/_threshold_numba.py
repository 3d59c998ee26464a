"""numba kernels of the dispersion thresholds (see :mod:`diffraction.threshold`).

One streaming pass down the image does all of the first stage: per-column sums
over the band of rows in the window are updated by adding the row that enters
and removing the row that leaves; prefix sums along the row give every
pixel's window totals; the dispersion test fills one row of the "not
background" mask; for ``dispersion_extended`` that row is eroded across
immediately and, ``radius`` rows later, down (a ring buffer holds the rows
still needed), so the eroded mask is written once and candidate pixels for the
second test are collected on the way. The second test then sums the
background window of each candidate directly (or streams again when
candidates are dense).

Window sums are exact int64, so they equal DIALS's summed-area-table doubles
for integer counts. Floating-point expressions keep DIALS's operand order
(no fastmath: no reassociation, no fused multiply-add).

Callers pass C-contiguous integer data whose valid pixels are > -2**24 (see
``threshold._as_exact_integers``) and a C-contiguous bool mask.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from beamstream.diffraction.threshold import BIG, ThresholdParams

# Above this fraction of candidate pixels the second dispersion_extended pass
# streams over the whole image instead of summing each candidate's window.
_DENSE_CANDIDATE_FRACTION = 0.02


@njit(cache=True, nogil=True)
def _update_columns(data, mask, add_row, sub_row, colm, colx, coly):
    """Column sums += row ``add_row`` - row ``sub_row`` (either may be -1 for none)."""
    width = data.shape[1]
    if add_row >= 0 and sub_row >= 0:
        for i in range(width):
            a = data[add_row, i]
            s = data[sub_row, i]
            ok_a = mask[add_row, i] & (a < BIG)
            ok_s = mask[sub_row, i] & (s < BIG)
            va = np.int64(a) * np.int64(ok_a)
            vs = np.int64(s) * np.int64(ok_s)
            colm[i] += np.int64(ok_a) - np.int64(ok_s)
            colx[i] += va - vs
            coly[i] += va * va - vs * vs
    elif add_row >= 0:
        for i in range(width):
            a = data[add_row, i]
            ok_a = mask[add_row, i] & (a < BIG)
            va = np.int64(a) * np.int64(ok_a)
            colm[i] += np.int64(ok_a)
            colx[i] += va
            coly[i] += va * va
    elif sub_row >= 0:
        for i in range(width):
            s = data[sub_row, i]
            ok_s = mask[sub_row, i] & (s < BIG)
            vs = np.int64(s) * np.int64(ok_s)
            colm[i] -= np.int64(ok_s)
            colx[i] -= vs
            coly[i] -= vs * vs


@njit(cache=True, nogil=True)
def _running_boxes(cm, cx, cy, k, bm, bx, by):
    """Sums of the column totals over [i-k, i+k] (clipped) for every column i.

    The steady-state loop indexes shifted slices with the loop counter only:
    numba adds a negative-index wraparound check to ``a[i - k - 1]`` that would
    cost more than the sums themselves.
    """
    width = cm.size
    sm = np.int64(0)
    sx = np.int64(0)
    sy = np.int64(0)
    for i in range(min(k, width)):
        sm += cm[i]
        sx += cx[i]
        sy += cy[i]
    for i in range(min(k + 1, width)):
        if i + k < width:
            sm += cm[i + k]
            sx += cx[i + k]
            sy += cy[i + k]
        bm[i] = sm
        bx[i] = sx
        by[i] = sy
    n = width - 2 * k - 1
    if n > 0:
        cm_in, cm_out, bm_out = cm[2 * k + 1 :], cm[:n], bm[k + 1 :]
        cx_in, cx_out, bx_out = cx[2 * k + 1 :], cx[:n], bx[k + 1 :]
        cy_in, cy_out, by_out = cy[2 * k + 1 :], cy[:n], by[k + 1 :]
        for t in range(n):
            sm += cm_in[t] - cm_out[t]
            sx += cx_in[t] - cx_out[t]
            sy += cy_in[t] - cy_out[t]
            bm_out[t] = sm
            bx_out[t] = sx
            by_out[t] = sy
    for i in range(max(width - k, k + 1), width):
        sm -= cm[i - k - 1]
        sx -= cx[i - k - 1]
        sy -= cy[i - k - 1]
        bm[i] = sm
        bx[i] = sx
        by[i] = sy


@njit(cache=True, nogil=True)
def _window_row(data, mask, j, ky, kx, colm, colx, coly, bm, bx, by):
    """Advance the column sums to row ``j`` and fill the row's window sums bm, bx, by."""
    height = data.shape[0]
    add_row = j + ky if j + ky < height else -1
    sub_row = j - ky - 1 if j - ky - 1 >= 0 else -1
    _update_columns(data, mask, add_row, sub_row, colm, colx, coly)
    _running_boxes(colm, colx, coly, kx, bm, bx, by)


@njit(cache=True, nogil=True)
def _dispersion_row(mask_row, bm, bx, by, min_count, nsig_b, gain, use_gain, out_row):
    """out_row[i] = DIALS's index-of-dispersion test (``a > c``) for valid pixels."""
    for i in range(bm.size):
        fm = np.float64(bm[i])
        fx = np.float64(bx[i])
        fy = np.float64(by[i])
        # Clamped for m < 1, where the m >= min_count (>= 2) test fails anyway.
        root = math.sqrt(max(2.0 * (fm - 1.0), 0.0))
        if use_gain:
            a = fm * fy - fx * fx
            c = gain * fx * ((fm - 1.0) + nsig_b * root)
        else:
            a = fm * fy - fx * fx - fx * (fm - 1.0)
            c = fx * nsig_b * root
        out_row[i] = mask_row[i] & (bm[i] >= min_count) & (bx[i] >= 0) & (a > c)


@njit(cache=True, nogil=True)
def _dispersion_final_row(mask_row, data_row, bm, bx, by, min_count, nsig_b, nsig_s, threshold, gain, use_gain,
                          out_row):
    """DIALS ``dispersion`` for one row: dispersion test and ``m*value - x > sigma_s*sqrt(x*m)``."""
    for i in range(bm.size):
        fm = np.float64(bm[i])
        fx = np.float64(bx[i])
        fy = np.float64(by[i])
        value = np.float64(data_row[i])
        root = math.sqrt(max(2.0 * (fm - 1.0), 0.0))
        if use_gain:
            a = fm * fy - fx * fx
            c = gain * fx * ((fm - 1.0) + nsig_b * root)
            d = nsig_s * math.sqrt(max(gain * fx * fm, 0.0))
        else:
            a = fm * fy - fx * fx - fx * (fm - 1.0)
            c = fx * nsig_b * root
            d = nsig_s * math.sqrt(max(fx * fm, 0.0))
        b = fm * value - fx
        out_row[i] = (mask_row[i] & (bm[i] >= min_count) & (bx[i] >= 0) & (value > threshold)
                      & (a > c) & (b > d))


@njit(cache=True, nogil=True)
def _primed_window_sums(data, mask, ky):
    """Column sums over the first ``ky`` rows and the per-row window buffers that ``_window_row`` fills:
    (colm, colx, coly, bm, bx, by)."""
    height, width = data.shape
    colm = np.zeros(width, np.int64)
    colx = np.zeros(width, np.int64)
    coly = np.zeros(width, np.int64)
    for row in range(min(ky, height)):
        _update_columns(data, mask, row, -1, colm, colx, coly)
    return colm, colx, coly, np.empty(width, np.int64), np.empty(width, np.int64), np.empty(width, np.int64)


@njit(cache=True, nogil=True)
def _dispersion_kernel(data, mask, ky, kx, min_count, nsig_b, nsig_s, threshold, gain, use_gain, out):
    """DIALS ``dispersion`` over the whole image."""
    height, width = data.shape
    colm, colx, coly, bm, bx, by = _primed_window_sums(data, mask, ky)
    for j in range(height):
        _window_row(data, mask, j, ky, kx, colm, colx, coly, bm, bx, by)
        _dispersion_final_row(mask[j], data[j], bm, bx, by, min_count, nsig_b, nsig_s, threshold, gain,
                              use_gain, out[j])


@njit(cache=True, nogil=True)
def _erode_row(not_bg, radius, zeros_prefix, out_row):
    """out_row[i] = no background pixel of this row within [i-radius, i+radius] (clipped)."""
    width = not_bg.size
    zeros_prefix[0] = 0
    total = np.int32(0)
    for i in range(width):
        total += 1 - np.int32(not_bg[i])
        zeros_prefix[i + 1] = total
    # zeros in [lo, hi) = prefix[hi] - prefix[lo]; the middle uses shifted slices (see _running_boxes).
    for i in range(min(radius, width)):
        out_row[i] = zeros_prefix[min(i + radius, width - 1) + 1] == 0
    n = width - 2 * radius
    if n > 0:
        upper = zeros_prefix[2 * radius + 1 :]
        lower = zeros_prefix[:n]
        middle = out_row[radius:]
        for t in range(n):
            middle[t] = upper[t] - lower[t] == 0
    for i in range(max(width - radius, radius), width):
        out_row[i] = zeros_prefix[width] - zeros_prefix[i - radius] == 0


@njit(cache=True, nogil=True)
def _finish_core_row(data, mask, jc, zeros_col, threshold, core, row_hits, candidates, n_candidates):
    """Write core row ``jc`` from the column background counts; append its candidates' flat indices."""
    width = data.shape[1]
    core_row = core[jc]
    mask_row = mask[jc]
    data_row = data[jc]
    n_hits = 0
    for i in range(width):
        is_core = zeros_col[i] == 0
        core_row[i] = is_core
        # Branch-free compaction: always write, advance only on a hit.
        row_hits[n_hits] = i
        n_hits += np.int64(is_core & mask_row[i] & (data_row[i] > threshold))
    if n_hits:
        if n_candidates + n_hits > candidates.size:
            bigger = np.empty(max(2 * candidates.size, n_candidates + n_hits), np.int64)
            bigger[:n_candidates] = candidates[:n_candidates]
            candidates = bigger
        offset = np.int64(jc) * width
        for t in range(n_hits):
            candidates[n_candidates + t] = offset + row_hits[t]
        n_candidates += n_hits
    return candidates, n_candidates


@njit(cache=True, nogil=True)
def _extended_first_stage(data, mask, ky, kx, min_count, nsig_b, gain, use_gain, radius, threshold, core):
    """Fill ``core`` (eroded not-background mask); return the candidate flat indices."""
    height, width = data.shape
    strong_row = np.empty(width, np.bool_)
    zeros_prefix = np.empty(width + 1, np.int32)
    n_ring = 2 * radius + 2
    ring = np.empty((n_ring, width), np.bool_)  # rows eroded across, still needed down the columns
    zeros_col = np.zeros(width, np.int32)
    row_hits = np.empty(width, np.int64)
    candidates = np.empty(4096, np.int64)
    n_candidates = 0

    colm, colx, coly, bm, bx, by = _primed_window_sums(data, mask, ky)
    for j in range(height):
        _window_row(data, mask, j, ky, kx, colm, colx, coly, bm, bx, by)
        _dispersion_row(mask[j], bm, bx, by, min_count, nsig_b, gain, use_gain, strong_row)
        for i in range(width):
            strong_row[i] = strong_row[i] | (not mask[j, i])  # masked pixels are not background
        slot = j % n_ring
        _erode_row(strong_row, radius, zeros_prefix, ring[slot])
        for i in range(width):
            zeros_col[i] += 1 - np.int32(ring[slot, i])
        jc = j - radius
        if jc >= 0:
            leaving = jc - radius - 1
            if leaving >= 0:
                old = leaving % n_ring
                for i in range(width):
                    zeros_col[i] -= 1 - np.int32(ring[old, i])
            candidates, n_candidates = _finish_core_row(
                data, mask, jc, zeros_col, threshold, core, row_hits, candidates, n_candidates
            )
    for jc in range(max(height - radius, 0), height):
        leaving = jc - radius - 1
        if leaving >= 0:
            old = leaving % n_ring
            for i in range(width):
                zeros_col[i] -= 1 - np.int32(ring[old, i])
        candidates, n_candidates = _finish_core_row(
            data, mask, jc, zeros_col, threshold, core, row_hits, candidates, n_candidates
        )
    return candidates[:n_candidates]


@njit(cache=True, nogil=True)
def _local_test(value, m, x, nsig_s, gain, use_gain):
    """DIALS's final dispersion_extended test from the background window sums."""
    if x < 0:
        return False
    fm = np.float64(m)
    fx = np.float64(x)
    mean = fx / fm if m >= 2 else 0.0
    if use_gain:
        return value >= mean + nsig_s * math.sqrt(gain * mean)
    return value >= mean + nsig_s * math.sqrt(mean)


@njit(cache=True, nogil=True)
def _final_sparse(data, mask, core, candidates, ky, kx, nsig_s, gain, use_gain, out):
    """Second pass at the candidates: sum each one's background window directly."""
    height, width = data.shape
    for q in candidates:
        j = q // width
        i = q - j * width
        m = np.int64(0)
        x = np.int64(0)
        i0 = max(i - kx, 0)
        i1 = min(i + kx, width - 1) + 1
        for jj in range(max(j - ky, 0), min(j + ky, height - 1) + 1):
            for ii in range(i0, i1):
                v = data[jj, ii]
                ok = mask[jj, ii] & (not core[jj, ii]) & (v < BIG)
                m += np.int64(ok)
                x += np.int64(v) * np.int64(ok)
        out[j, i] = _local_test(np.float64(data[j, i]), m, x, nsig_s, gain, use_gain)


@njit(cache=True, nogil=True)
def _update_background_columns(data, mask, core, row, sign, colm, colx):
    for i in range(data.shape[1]):
        v = data[row, i]
        ok = mask[row, i] & (not core[row, i]) & (v < BIG)
        colm[i] += sign * np.int64(ok)
        colx[i] += sign * np.int64(v) * np.int64(ok)


@njit(cache=True, nogil=True)
def _final_dense(data, mask, core, ky, kx, nsig_s, threshold, gain, use_gain, out):
    """Second pass streaming the background window sums over the whole image."""
    height, width = data.shape
    colm = np.zeros(width, np.int64)
    colx = np.zeros(width, np.int64)
    no_y = np.zeros(width, np.int64)
    bm = np.empty(width, np.int64)
    bx = np.empty(width, np.int64)
    by = np.empty(width, np.int64)
    for row in range(min(ky, height)):
        _update_background_columns(data, mask, core, row, 1, colm, colx)
    for j in range(height):
        if j + ky < height:
            _update_background_columns(data, mask, core, j + ky, 1, colm, colx)
        if j - ky - 1 >= 0:
            _update_background_columns(data, mask, core, j - ky - 1, -1, colm, colx)
        _running_boxes(colm, colx, no_y, kx, bm, bx, by)
        for i in range(width):
            if core[j, i] and mask[j, i]:
                value = np.float64(data[j, i])
                if value > threshold:
                    out[j, i] = _local_test(value, bm[i], bx[i], nsig_s, gain, use_gain)


def _gain(params: ThresholdParams) -> tuple[bool, float]:
    use_gain = params.gain is not None
    return use_gain, float(params.gain) if use_gain else 1.0


def dispersion(data: np.ndarray, mask: np.ndarray, params: ThresholdParams) -> np.ndarray:
    """DIALS ``dispersion`` strong-pixel mask (integer data only)."""
    ky, kx = (int(k) for k in params.kernel_size)
    use_gain, gain = _gain(params)
    out = np.empty(data.shape, dtype=np.bool_)
    _dispersion_kernel(data, mask, ky, kx, params.min_count, float(params.sigma_background),
                       float(params.sigma_strong), float(params.global_threshold), gain, use_gain, out)
    return out


def dispersion_extended(data: np.ndarray, mask: np.ndarray, params: ThresholdParams) -> np.ndarray:
    """DIALS ``dispersion_extended`` strong-pixel mask (integer data only)."""
    ky, kx = (int(k) for k in params.kernel_size)
    use_gain, gain = _gain(params)
    threshold = float(params.global_threshold)
    nsig_s = float(params.sigma_strong)
    core = np.empty(data.shape, dtype=np.bool_)
    candidates = _extended_first_stage(data, mask, ky, kx, params.min_count, float(params.sigma_background),
                                       gain, use_gain, params.erosion_distance - 1, threshold, core)
    out = np.zeros(data.shape, dtype=np.bool_)
    if candidates.size > _DENSE_CANDIDATE_FRACTION * data.size:
        _final_dense(data, mask, core, ky + 2, kx + 2, nsig_s, threshold, gain, use_gain, out)
    elif candidates.size:
        _final_sparse(data, mask, core, candidates, ky + 2, kx + 2, nsig_s, gain, use_gain, out)
    return out
