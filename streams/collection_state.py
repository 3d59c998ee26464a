"""Per-collection state: what the collection table holds, and how events change it.

Pure functions over a small JSON-serialisable record; no Kafka. Every update is
idempotent (a result for an image already seen changes nothing), so replays and
redeliveries cannot count an image twice, and folding all results of a
collection in any order gives the same state.
"""

from __future__ import annotations

import base64
import copy
import json
import math
from dataclasses import dataclass, field, fields, replace
from datetime import datetime

import numpy as np

from beamstream.diffraction.centring import GridShape, find_xray_centre
from beamstream.streams.sample_centring import PLANES

#: d_min histogram: bins of 0.02 Å from 0.5 Å; the median is reported to a bin's centre.
D_MIN_BIN_A = 0.02
D_MIN_LOW_A = 0.5
D_MIN_BINS = 500
#: The highest image number a collection may have: the bitmap of images seen (a bit each) is part of the
#: table's changelog record, which must stay well under Kafka's record limit (1 MB): 2**21 bits are 256 KiB.
MAX_IMAGE_NUMBER = 2**21
#: The most grid positions: a grid's per-image counts are in the changelog record too (about 12 bytes each).
MAX_GRID_POSITIONS = 40_000


def state_key(dcid: int, processing_job_id: int | None) -> str:
    """Table key: live processing and each reprocessing job of a collection are separate."""
    return f"{dcid}:{processing_job_id if processing_job_id is not None else 'live'}"


@dataclass
class CollectionState:
    """Everything the pipeline knows about one collection (or one reprocessing of it)."""

    dcid: int
    processing_job_id: int | None = None
    started: bool = False
    experiment_type: str = "other"
    expected: int = 0
    start_image_number: int = 1
    grid: dict | None = None
    sample_id: int | None = None
    ended: bool = False
    ended_at: float | None = None  # epoch seconds of the end event
    images_collected: int | None = None
    seen: bytearray = field(default_factory=bytearray)  # bitmap by image number
    n_seen: int = 0
    total_spots: int = 0
    best_image: int | None = None
    best_spots: int = -1
    d_min_histogram: dict[int, int] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)  # image number -> spots (grids only)
    summarized: bool = False
    announced: int = 0  # n_seen at the last progress announcement
    last_activity: float | None = None  # worker clock (epoch s) when a new result last came in

    def copy(self) -> CollectionState:
        """An independent copy (what the table hands a reader: faster than a generic deep copy)."""
        return replace(self, grid=copy.deepcopy(self.grid), seen=bytearray(self.seen),
                       d_min_histogram=dict(self.d_min_histogram), counts=dict(self.counts))

    # -- bitmap -------------------------------------------------------------
    def has_image(self, image_number: int) -> bool:
        byte, bit = divmod(image_number, 8)
        return byte < len(self.seen) and bool(self.seen[byte] & (1 << bit))

    def _mark(self, image_number: int) -> None:
        byte, bit = divmod(image_number, 8)
        if byte >= len(self.seen):
            self.seen.extend(bytes(byte + 1 - len(self.seen)))
        self.seen[byte] |= 1 << bit

    def image_numbers(self) -> list[int]:
        """Image numbers with a result, ascending."""
        bits = np.unpackbits(np.frombuffer(bytes(self.seen), dtype=np.uint8), bitorder="little")
        return [int(i) for i in np.nonzero(bits)[0]]

    # -- serialisation ------------------------------------------------------
    def to_json(self) -> bytes:
        """Compact JSON bytes (what the table's changelog carries)."""
        # Shallow: asdict() deep-copies every field, most of the cost on a large grid.
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["seen"] = base64.b64encode(bytes(self.seen)).decode()
        record["d_min_histogram"] = {str(k): v for k, v in self.d_min_histogram.items()}
        record["counts"] = {str(k): v for k, v in self.counts.items()}
        return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CollectionState:
        record = json.loads(data)
        record["seen"] = bytearray(base64.b64decode(record["seen"]))
        record["d_min_histogram"] = {int(k): v for k, v in record["d_min_histogram"].items()}
        record["counts"] = {int(k): v for k, v in record["counts"].items()}
        return cls(**record)

    def comparable(self) -> dict:
        """The state without bookkeeping of when things were announced (for equality checks)."""
        record = json.loads(self.to_json())
        record.pop("announced")
        record.pop("ended_at")
        record.pop("last_activity")
        return record


def event_problem(record_type: str, value: dict) -> str | None:
    """Why an event cannot be folded into a collection's state (numbers no table entry can hold), or None."""
    dcid = value["dcid"]
    if record_type == "ImageResult":
        number = value["image_number"]
        if not 0 <= number <= MAX_IMAGE_NUMBER:
            return f"image number {number} of dcid {dcid} is outside 0..{MAX_IMAGE_NUMBER}"
    elif record_type == "CollectionStarted":
        first, count = value["start_image_number"], value["number_of_images"]
        if count < 0 or first < 0 or first + count - 1 > MAX_IMAGE_NUMBER:
            return (f"dcid {dcid} starts at image {first} with {count} images: "
                    f"image numbers must lie within 0..{MAX_IMAGE_NUMBER}")
        grid = value.get("grid")
        if grid and not (grid["rows"] >= 1 and grid["columns"] >= 1
                         and grid["rows"] * grid["columns"] <= MAX_GRID_POSITIONS):
            return (f"dcid {dcid} has a grid of {grid['rows']} x {grid['columns']}: "
                    f"1 to {MAX_GRID_POSITIONS} positions expected")
        if grid and grid["plane"] not in PLANES:  # the summary carries it (a megabyte would not fit)
            return f"dcid {dcid} has a grid in plane {grid['plane'][:40]!r}: xy or xz expected"
    return None


def _epoch(value: datetime | float | int) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def apply_start(state: CollectionState, started: dict) -> None:
    """Record a CollectionStarted event."""
    state.started = True
    state.experiment_type = started["experiment_type"]
    state.expected = started["number_of_images"]
    state.start_image_number = started.get("start_image_number", 1)
    state.grid = started.get("grid")
    state.sample_id = started.get("sample_id")
    if state.experiment_type != "grid":
        state.counts = {}  # per-image counts are kept for heat maps only


def apply_end(state: CollectionState, ended: dict) -> None:
    """Record a CollectionEnded event (the first one wins)."""
    if not state.ended:
        state.ended = True
        state.ended_at = _epoch(ended["event_time"])
        state.images_collected = ended["images_collected"]


def apply_result(state: CollectionState, result: dict, now: float | None = None) -> bool:
    """Fold one ImageResult in; returns False (and changes nothing) for an image already seen.

    ``now`` (the worker's clock) records activity, which postpones the timeout for
    missing images while results are still coming in.
    """
    image = result["image_number"]
    if state.has_image(image):
        return False
    state._mark(image)
    if now is not None:
        state.last_activity = now
    state.n_seen += 1
    spots = result["n_spots_no_ice"]
    state.total_spots += spots
    # Ties go to the lower image number so the outcome does not depend on arrival order.
    if spots > state.best_spots or (spots == state.best_spots and image < (state.best_image or 1 << 31)):
        state.best_spots = spots
        state.best_image = image
    d_min = result.get("estimated_d_min")
    if d_min is not None and math.isfinite(d_min):
        position = (d_min - D_MIN_LOW_A) / D_MIN_BIN_A  # infinite for d_min near the largest double
        index = D_MIN_BINS - 1 if position >= D_MIN_BINS - 1 else max(0, int(position))
        state.d_min_histogram[index] = state.d_min_histogram.get(index, 0) + 1
    if not state.started or state.experiment_type == "grid":
        state.counts[image] = spots
    return True


def median_d_min(state: CollectionState) -> float | None:
    """Median estimated_d_min over images that have one, to the histogram's resolution."""
    total = sum(state.d_min_histogram.values())
    if total == 0:
        return None
    running = 0
    for index in sorted(state.d_min_histogram):
        running += state.d_min_histogram[index]
        if running * 2 >= total:
            return round(D_MIN_LOW_A + (index + 0.5) * D_MIN_BIN_A, 3)
    return None


def progress_due(state: CollectionState, finishing: bool = False, every_fraction: float = 0.05) -> bool:
    """True when a progress announcement should go out now.

    One goes out for every ``every_fraction`` of the expected images, and always for
    the images not yet announced when the collection is ``finishing`` (its summary
    goes out with this event): otherwise the last word on the announce topic could
    stay short of the summary's count, e.g. 24 of 25 images with a step of 2, or
    nothing at all for results folded in before the collection's start event.
    """
    if not state.started or state.n_seen <= state.announced:
        return False
    if finishing:
        return True
    step = max(1, math.ceil(state.expected * every_fraction)) if state.expected else 10
    return state.n_seen - state.announced >= step


def missing_images(state: CollectionState) -> list[int]:
    """Expected image numbers without a result."""
    first = state.start_image_number
    return [n for n in range(first, first + state.expected) if not state.has_image(n)]


def completion(state: CollectionState, now: float, timeout_s: float, owned_since: float = 0.0,
               settled: bool = True) -> str | None:
    """``complete`` when every expected image has a result, ``incomplete`` when the
    collection ended, no new result came for ``timeout_s`` and the images still
    outstanding are ``settled`` (nothing announced is still being analysed), else None.

    Measuring the timeout from the last activity, not from the end event, keeps a
    slow or restarting worker's images from being declared missing while they are
    still being analysed. ``owned_since`` is when this process took the collection's
    partition over: results may have queued up while nobody owned it, so a takeover
    starts the wait again.
    """
    if state.summarized or not state.started:
        return None
    expected = state.expected
    if state.ended and state.images_collected is not None:
        expected = min(expected, state.images_collected)
    # n_seen counts distinct images, so fewer than expected cannot cover the range: the scan (as long as the
    # collection) runs only once it can succeed, not on every result.
    first = state.start_image_number
    if state.n_seen >= expected and all(state.has_image(n) for n in range(first, first + expected)):
        return "complete" if expected == state.expected else "incomplete"
    if timed_out(state, now, timeout_s, owned_since) and settled:
        return "incomplete"
    return None


def quiet_since(state: CollectionState, owned_since: float = 0.0) -> float | None:
    """Since when an ended collection has had no news (None while it has not ended)."""
    if not state.ended or state.ended_at is None:
        return None
    return max(state.ended_at, state.last_activity or 0.0, owned_since)


def timed_out(state: CollectionState, now: float, timeout_s: float, owned_since: float = 0.0) -> bool:
    """True when an ended collection has been quiet for ``timeout_s``."""
    since = quiet_since(state, owned_since)
    return since is not None and now - since >= timeout_s


def heat_map(state: CollectionState) -> np.ndarray | None:
    """Spots per grid position as a (rows, columns) array, for grid scans."""
    if not state.grid:
        return None
    shape = GridShape(state.grid["rows"], state.grid["columns"], state.grid.get("snaked", False))
    grid = np.zeros((shape.rows, shape.columns), dtype=np.int64)
    for image, spots in state.counts.items():
        index = image - state.start_image_number
        if 0 <= index < shape.rows * shape.columns:
            row, column = shape.position(index)
            grid[row, column] = spots
    return grid


def build_summary(state: CollectionState, status: str, event_time: datetime) -> dict:
    """The CollectionSummary value for a finished collection."""
    grid = heat_map(state)
    xray_centre = None
    if grid is not None:
        found = find_xray_centre(grid)
        if found is not None:
            g = state.grid
            x_mm, y_mm = found.to_motor(g.get("origin_x_mm", 0.0), g.get("origin_y_mm", 0.0),
                                        g["step_x_um"], g["step_y_um"])
            xray_centre = {
                "centre_column": found.centre_column, "centre_row": found.centre_row,
                "centre_x_mm": x_mm, "centre_y_mm": y_mm,
                "min_column": found.min_column, "max_column": found.max_column,
                "min_row": found.min_row, "max_row": found.max_row,
                "n_positions": found.n_positions, "total_count": found.total_count,
            }
    return {
        "dcid": state.dcid,
        "processing_job_id": state.processing_job_id,
        "experiment_type": state.experiment_type,
        "status": status,
        "images_expected": state.expected,
        "images_analysed": state.n_seen,
        "missing_images": missing_images(state),
        "best_image": state.best_image,
        "best_image_spots": max(state.best_spots, 0),
        "total_spots": state.total_spots,
        "median_d_min": median_d_min(state),
        "xray_centre": xray_centre,
        "heat_map": [int(v) for v in grid.ravel()] if grid is not None else [],
        "sample_id": state.sample_id,
        "grid_plane": state.grid.get("plane") if state.grid else None,
        "data_reduction_requested": state.experiment_type == "rotation",
        "event_time": event_time,
    }


def build_progress(state: CollectionState, event_time: datetime) -> dict:
    """The CollectionProgress value for an announcement."""
    return {
        "dcid": state.dcid,
        "processing_job_id": state.processing_job_id,
        "images_expected": state.expected,
        "images_analysed": state.n_seen,
        "best_image": state.best_image,
        "best_image_spots": max(state.best_spots, 0),
        "event_time": event_time,
    }


def build_data_reduction_request(state: CollectionState, event_time: datetime) -> dict:
    """The ProcessingRequest a finished rotation scan emits: data reduction, its spots found "front-loaded"."""
    key = state_key(state.dcid, state.processing_job_id)
    return {
        "request_id": f"data-reduction-{key}", "kind": "data_reduction",
        "dcid": state.dcid, "processing_job_id": state.processing_job_id,
        "recipe": "data-reduction", "parameters": {"spotfinding": "front-loaded"},
        "image_ranges": [{"start": state.start_image_number, "end": state.start_image_number + state.expected - 1}],
        "requested_by": "beamstream", "event_time": event_time,
    }
