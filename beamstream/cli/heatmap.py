"""Grid-scan heat maps as text, for terminals."""

from __future__ import annotations

SHADES = " .:-=+*#%@"


def render_heat_map(counts: list[int], rows: int, columns: int,
                    centre: tuple[float, float] | None = None) -> str:
    """A rows x columns block of spot counts, shaded by strength, with the X-ray centre's
    nearest grid position marked ``X`` (``centre`` is (row, column), 0-based)."""
    if len(counts) != rows * columns:
        raise ValueError(f"heat map has {len(counts)} values, expected {rows}x{columns}")
    peak = max(counts) if counts else 0
    marked = (round(centre[0]), round(centre[1])) if centre is not None else None
    width = max(3, len(str(peak)))
    lines = ["     " + " ".join(f"{c:>{width}}" for c in range(columns))]
    for row in range(rows):
        cells = []
        for column in range(columns):
            value = counts[row * columns + column]
            if (row, column) == marked:
                cells.append("X".rjust(width))
            else:
                # Any spots at all show at least the weakest shade; "·" is kept for none.
                shade = SHADES[max(1, min(len(SHADES) - 1, int(value / peak * (len(SHADES) - 1))))]
                cells.append((shade * width) if value else "·".rjust(width))
        lines.append(f"{row:>4} " + " ".join(cells))
    lines.append(f"      shading: '{SHADES[1]}' weak ... '{SHADES[-1]}' {peak} spots;  X = X-ray centre")
    return "\n".join(lines)


def count_table(counts: list[int], rows: int, columns: int) -> str:
    """The raw counts as an aligned table."""
    width = max(3, len(str(max(counts or [0]))))
    return "\n".join(" ".join(f"{counts[r * columns + c]:>{width}}" for c in range(columns)) for r in range(rows))
