"""A plain, slow reference of DIALS's spot-finding arithmetic, for tests on small crops.

Written from DIALS's definitions (``local.h``, ``distance.h``, ``pixel_list.h``,
the shoebox centroid and summation code) with no cleverness: every pixel's
window is summed directly, the Chebyshev distance transform is the literal
two-pass chamfer, connected components are found by flood fill. Integer counts
make the direct sums exact, so they equal DIALS's summed-area-table sums.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

BIG = 1 << 24  # DIALS leaves pixels >= 2**24 out of the window sums


def _to_lists(data: np.ndarray, mask: np.ndarray) -> tuple[list, list]:
    return [[float(v) for v in row] for row in data], [[bool(v) for v in row] for row in mask]


def window_sums(values, usable, j, i, ky, kx):
    """(count, sum, sum of squares) of usable pixels in [j-ky, j+ky] x [i-kx, i+kx], clipped."""
    height, width = len(values), len(values[0])
    m, x, y = 0, 0.0, 0.0
    for jj in range(max(j - ky, 0), min(j + ky, height - 1) + 1):
        for ii in range(max(i - kx, 0), min(i + kx, width - 1) + 1):
            if usable[jj][ii]:
                v = values[jj][ii]
                m += 1
                x += v
                y += v * v
    return float(m), x, y


def _usable(values, valid):
    return [[valid[j][i] and values[j][i] < BIG for i in range(len(values[0]))] for j in range(len(values))]


def dispersion_test(m, x, y, nsig_b, gain):
    """DIALS's index-of-dispersion test, same operand order as local.h."""
    if gain is None:
        a = m * y - x * x - x * (m - 1)
        c = x * nsig_b * math.sqrt(2 * (m - 1))
    else:
        a = m * y - x * x
        c = gain * x * (m - 1 + nsig_b * math.sqrt(2 * (m - 1)))
    return a > c


def reference_dispersion(data, mask, kernel_size=(3, 3), nsig_b=6.0, nsig_s=3.0, threshold=0.0,
                         min_count=2, gain=None) -> np.ndarray:
    """DIALS ``DispersionThreshold``: strong where both the dispersion and the strong-value tests pass."""
    values, valid = _to_lists(data, mask)
    usable = _usable(values, valid)
    ky, kx = kernel_size
    height, width = len(values), len(values[0])
    out = np.zeros((height, width), dtype=bool)
    for j in range(height):
        for i in range(width):
            if not valid[j][i]:
                continue
            m, x, y = window_sums(values, usable, j, i, ky, kx)
            value = values[j][i]
            if m >= min_count and x >= 0 and value > threshold:
                b = m * value - x
                d = nsig_s * math.sqrt(x * m) if gain is None else nsig_s * math.sqrt(gain * x * m)
                out[j, i] = dispersion_test(m, x, y, nsig_b, gain) and b > d
    return out


def chebyshev_distance(is_feature: list[list[bool]]) -> list[list[int]]:
    """Distance to the nearest False pixel, DIALS's two-pass chamfer (image borders are not False)."""
    height, width = len(is_feature), len(is_feature[0])
    far = height + width
    dist = [[0] * width for _ in range(height)]
    for j in range(height):  # forward: north, west, north-west, north-east
        for i in range(width):
            if not is_feature[j][i]:
                dist[j][i] = 0
                continue
            n = dist[j - 1][i] if j > 0 else far
            w = dist[j][i - 1] if i > 0 else far
            nw = dist[j - 1][i - 1] if j > 0 and i > 0 else far
            ne = dist[j - 1][i + 1] if j > 0 and i < width - 1 else far
            dist[j][i] = 1 + min(n, w, nw, ne)
    for j in range(height - 1, -1, -1):  # backward: south, east, south-west, south-east
        for i in range(width - 1, -1, -1):
            s = dist[j + 1][i] if j < height - 1 else far
            e = dist[j][i + 1] if i < width - 1 else far
            sw = dist[j + 1][i - 1] if j < height - 1 and i > 0 else far
            se = dist[j + 1][i + 1] if j < height - 1 and i < width - 1 else far
            other = min(s, e, sw, se)
            if other < dist[j][i]:
                dist[j][i] = 1 + other
    return dist


def reference_dispersion_extended(data, mask, kernel_size=(3, 3), nsig_b=6.0, nsig_s=3.0, threshold=0.0,
                                  min_count=2, gain=None) -> np.ndarray:
    """DIALS ``DispersionExtendedThreshold``: dispersion test, erosion, mean of the background."""
    values, valid = _to_lists(data, mask)
    usable = _usable(values, valid)
    ky, kx = kernel_size
    height, width = len(values), len(values[0])

    # 1. "not background": masked pixels, and valid pixels passing the dispersion test.
    not_background = [[True] * width for _ in range(height)]
    for j in range(height):
        for i in range(width):
            if valid[j][i]:
                m, x, y = window_sums(values, usable, j, i, ky, kx)
                not_background[j][i] = m >= min_count and x >= 0 and dispersion_test(m, x, y, nsig_b, gain)

    # 2. Erosion: keep pixels at Chebyshev distance >= min(kernel) from any background pixel.
    distance = chebyshev_distance(not_background)
    erosion = min(kernel_size)
    background = [
        [valid[j][i] and not (not_background[j][i] and distance[j][i] >= erosion) for i in range(width)]
        for j in range(height)
    ]

    # 3. Strong: in the eroded region, above the global threshold and mean + n*sqrt(mean) of the background.
    usable_bg = _usable(values, background)
    out = np.zeros((height, width), dtype=bool)
    for j in range(height):
        for i in range(width):
            if not valid[j][i] or background[j][i]:
                continue
            m, x, _ = window_sums(values, usable_bg, j, i, ky + 2, kx + 2)
            if x < 0:
                continue
            mean = x / m if m >= 2 else 0.0
            spread = mean if gain is None else gain * mean
            value = values[j][i]
            out[j, i] = value > threshold and value >= mean + nsig_s * math.sqrt(spread)
    return out


def reference_spots(data, strong, min_spot_size=3, max_spot_size=1000, max_separation=2.0) -> list[dict]:
    """DIALS's 2-D strong-spot extraction: 4-connected components numbered by first raster pixel,
    size filter, float32 sums, intensity-weighted centroid of pixel centres, peak-distance filter."""
    height, width = strong.shape
    seen = np.zeros(strong.shape, dtype=bool)
    spots = []
    for j0 in range(height):
        for i0 in range(width):
            if not strong[j0, i0] or seen[j0, i0]:
                continue
            pixels = []
            queue = deque([(j0, i0)])
            seen[j0, i0] = True
            while queue:
                j, i = queue.popleft()
                pixels.append((j, i))
                for jj, ii in ((j - 1, i), (j + 1, i), (j, i - 1), (j, i + 1)):
                    if 0 <= jj < height and 0 <= ii < width and strong[jj, ii] and not seen[jj, ii]:
                        seen[jj, ii] = True
                        queue.append((jj, ii))
            pixels.sort()  # raster order, the order DIALS's shoebox loops visit them
            spots.append(pixels)

    result = []
    for pixels in spots:
        n = len(pixels)
        if not min_spot_size <= n <= max_spot_size:
            continue
        x0 = min(i for _, i in pixels)
        x1 = max(i for _, i in pixels) + 1
        y0 = min(j for j, _ in pixels)
        y1 = max(j for j, _ in pixels) + 1
        total = np.float32(0.0)
        sum_x = 0.0
        sum_y = 0.0
        peak, peak_value = None, None
        for j, i in pixels:
            v = np.float32(float(data[j, i]))
            total = np.float32(total + v)
            sum_x += float(v) * ((i - x0) + 0.5)
            sum_y += float(v) * ((j - y0) + 0.5)
            if peak_value is None or v > peak_value:
                peak, peak_value = (i + 0.5, j + 0.5), v
        if float(total) > 0:
            cx = sum_x / float(total) + x0
            cy = sum_y / float(total) + y0
        else:
            cx, cy = (x1 + x0) / 2.0, (y1 + y0) / 2.0
        if max_separation is not None:
            dx, dy = peak[0] - cx, peak[1] - cy
            if math.sqrt(dx * dx + dy * dy + 0.0) > max_separation:
                continue
        result.append(
            {"x_px": cx, "y_px": cy, "intensity": float(total), "variance": float(abs(total)),
             "n_pixels": n, "bbox": (x0, x1, y0, y1)}
        )
    return result
