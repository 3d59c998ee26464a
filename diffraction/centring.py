"""X-ray centring from a grid scan's per-position spot counts.

The diffracting region is the 4-connected region of grid positions around the
strongest one whose counts reach a fraction of the maximum; its count-weighted
centre of mass is the crystal centre. Pure functions, no Kafka.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GridShape:
    """How image numbers map onto grid positions."""

    rows: int
    columns: int
    snaked: bool = False

    def position(self, index: int) -> tuple[int, int]:
        """(row, column) of the ``index``-th image of the scan (0-based acquisition order)."""
        row, column = divmod(index, self.columns)
        if self.snaked and row % 2 == 1:
            column = self.columns - 1 - column
        return row, column

    def flat(self, index: int) -> int:
        """Row-major position of the ``index``-th image."""
        row, column = self.position(index)
        return row * self.columns + column


@dataclass(frozen=True)
class CentringResult:
    """The diffracting region of a grid scan (0-based grid rows/columns)."""

    centre_column: float
    centre_row: float
    min_column: int
    max_column: int
    min_row: int
    max_row: int
    n_positions: int
    total_count: int
    best_position: tuple[int, int]

    def to_motor(self, origin_x_mm: float, origin_y_mm: float, step_x_um: float, step_y_um: float
                 ) -> tuple[float, float]:
        """The centre in motor coordinates (mm) given the first grid point and the steps."""
        return (origin_x_mm + self.centre_column * step_x_um / 1000.0,
                origin_y_mm + self.centre_row * step_y_um / 1000.0)

    def as_dict(self) -> dict:
        return asdict(self)


def find_xray_centre(counts: np.ndarray, threshold_fraction: float = 0.5) -> CentringResult | None:
    """Centre of the diffracting region in a (rows, columns) array of spot counts.

    Returns None when nothing diffracted (all counts zero). Ties for the maximum
    go to the first position in row-major order, so the result is deterministic.
    """
    grid = np.asarray(counts, dtype=np.int64)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"counts must be a non-empty 2-D grid, got shape {grid.shape}")
    peak = int(grid.max())
    if peak <= 0:
        return None
    threshold = max(1.0, threshold_fraction * peak)
    start = np.unravel_index(int(np.argmax(grid)), grid.shape)
    region = np.zeros(grid.shape, dtype=bool)
    region[start] = True
    queue = deque([start])
    while queue:
        row, column = queue.popleft()
        for d_row, d_column in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            r, c = row + d_row, column + d_column
            if 0 <= r < grid.shape[0] and 0 <= c < grid.shape[1] and not region[r, c] and grid[r, c] >= threshold:
                region[r, c] = True
                queue.append((r, c))
    rows, columns = np.nonzero(region)
    weights = grid[rows, columns].astype(float)
    total = weights.sum()
    return CentringResult(
        centre_column=float((columns * weights).sum() / total),
        centre_row=float((rows * weights).sum() / total),
        min_column=int(columns.min()), max_column=int(columns.max()),
        min_row=int(rows.min()), max_row=int(rows.max()),
        n_positions=int(region.sum()), total_count=int(total),
        best_position=(int(start[0]), int(start[1])),
    )


def combine_orthogonal(xy: tuple[float, float], xz: tuple[float, float]) -> tuple[float, float, float]:
    """A 3D centre from an xy grid (x, y) and an orthogonal xz grid (x, z) of one sample.

    x is seen by both scans; their mean is taken.
    """
    return ((xy[0] + xz[0]) / 2.0, xy[1], xz[1])
