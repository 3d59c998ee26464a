"""The dashboard's in-memory view of the pipeline, folded from committed topic records.

Pure bookkeeping, no Kafka: :meth:`DashboardView.apply` takes one decoded record
(the logical topic, the record type, its value and where it sat) and the JSON
methods answer the API. Everything is guarded by one lock because the feed thread
writes while the web server's event loop reads.

Records can arrive in any order across topics (a result may be read before its
collection's start), so a collection's entry is created by whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from beamstream.diffraction.centring import GridShape

#: A heartbeat older than this many seconds marks its service as stale (workers beat every 5 s).
STALE_AFTER_S = 20.0
#: Dead letters kept in memory (the newest); the dead-letter tools read the whole topic when acting.
MAX_DEAD_LETTERS = 500
#: Most points a rotation plot gets; longer sweeps are thinned evenly (a 20,000-image sweep is 2 MB of JSON).
MAX_PLOT_POINTS = 2000
#: Message rates are records per second over this window, by the records' own timestamps (so a
#: restarted dashboard reading old records shows no phantom burst).
RATE_WINDOW_S = 60.0
#: The process monitor's decisions and warnings kept (its routine observations only update its status).
MAX_MONITOR_EVENTS = 50


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def run_id(dcid: int, processing_job_id: int | None) -> str:
    """The name of one processing run of a collection: ``dcid`` live, ``dcid/job`` for a reprocessing."""
    return str(dcid) if processing_job_id is None else f"{dcid}/{processing_job_id}"


@dataclass
class CollectionView:
    """What the dashboard knows about one processing run of a collection."""

    dcid: int
    processing_job_id: int | None = None
    experiment_type: str = "unknown"
    beamline: str = ""
    file_template: str = ""
    images_expected: int = 0
    start_image_number: int = 1
    grid: dict | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    end_status: str | None = None
    spots: dict[int, int] = field(default_factory=dict)  # image number -> spots (no ice rings)
    d_min: dict[int, float | None] = field(default_factory=dict)  # image number -> estimated d_min (Å)
    announced: int = 0  # images analysed according to the latest progress announcement
    summary: dict | None = None
    updated: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return run_id(self.dcid, self.processing_job_id)

    @property
    def images_analysed(self) -> int:
        if self.summary is not None:
            return self.summary["images_analysed"]
        return max(len(self.spots), self.announced)

    @property
    def state(self) -> str:
        """started / running / ended while open; the summary's status (complete, timeout ...) once summarised."""
        if self.summary is not None:
            return self.summary["status"]
        if self.ended_at is not None:
            return "ended"
        return "running" if self.spots else "started"

    def best(self) -> tuple[int | None, int]:
        if self.summary is not None:
            return self.summary["best_image"], self.summary["best_image_spots"]
        if not self.spots:
            return None, 0
        image = max(self.spots, key=lambda n: (self.spots[n], -n))
        return image, self.spots[image]

    def heat_map(self) -> list[int | None] | None:
        """Spots per grid position, row-major; None where no result came yet (the summary's map once there)."""
        if not self.grid:
            return None
        rows, columns = self.grid["rows"], self.grid["columns"]
        if self.summary is not None and len(self.summary["heat_map"]) == rows * columns:
            return list(self.summary["heat_map"])
        shape = GridShape(rows, columns, self.grid.get("snaked", False))
        cells: list[int | None] = [None] * (rows * columns)
        for image, count in self.spots.items():
            index = image - self.start_image_number
            if 0 <= index < rows * columns:
                row, column = shape.position(index)
                cells[row * columns + column] = count
        return cells

    def series(self) -> list[dict]:
        """Spots and resolution per image, in image order (thinned to MAX_PLOT_POINTS)."""
        images = sorted(self.spots)
        step = max(1, -(-len(images) // MAX_PLOT_POINTS))
        return [{"image": n, "spots": self.spots[n], "d_min": self.d_min.get(n)} for n in images[::step]]

    def row(self) -> dict:
        """The collection list's entry."""
        best_image, best_spots = self.best()
        return {
            "id": self.id, "dcid": self.dcid, "processing_job_id": self.processing_job_id,
            "experiment_type": self.experiment_type, "beamline": self.beamline, "state": self.state,
            "images_expected": self.images_expected, "images_analysed": self.images_analysed,
            "best_image": best_image, "best_image_spots": best_spots,
            "grid": {"rows": self.grid["rows"], "columns": self.grid["columns"]} if self.grid else None,
            "started_at": _iso(self.started_at), "ended_at": _iso(self.ended_at),
            "has_summary": self.summary is not None,
        }

    def detail(self) -> dict:
        """Everything the page draws for one collection."""
        detail = self.row()
        detail["file_template"] = self.file_template
        detail["grid"] = dict(self.grid) if self.grid else None
        detail["heat_map"] = self.heat_map()
        detail["series"] = self.series() if not self.grid else []
        summary = self.summary
        detail["summary"] = None if summary is None else {
            "status": summary["status"], "images_analysed": summary["images_analysed"],
            "images_expected": summary["images_expected"], "missing_images": list(summary["missing_images"]),
            "best_image": summary["best_image"], "total_spots": summary["total_spots"],
            "median_d_min": summary["median_d_min"], "xray_centre": summary["xray_centre"],
            "event_time": _iso(summary["event_time"]),
        }
        return detail


class DashboardView:
    """Collections, services and dead letters as read from the topics (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.collections: dict[str, CollectionView] = {}
        self.services: dict[str, dict] = {}
        self.dead_letters: OrderedDict[str, dict] = OrderedDict()
        self.resolutions: dict[str, dict] = {}
        self.records_read = 0
        self.arrivals: dict[str, deque[float]] = {}  # logical topic -> record timestamps within the window
        self.lags: dict[tuple[str, str], dict] = {}  # (group, topic) -> last measurement
        self.monitor_events: deque[dict] = deque(maxlen=MAX_MONITOR_EVENTS)
        self.monitor_status: dict[str, dict] = {}  # monitor id -> its latest observation

    # -- folding ---------------------------------------------------------------------
    def apply(self, topic: str, record_type: str, value: dict, partition: int = 0, offset: int = 0,
              key: bytes | None = None) -> None:
        """Fold one committed record of logical topic ``topic`` into the view."""
        with self._lock:
            self.records_read += 1
            handler = getattr(self, f"_on_{record_type}", None)
            if handler is not None:
                handler(value, partition=partition, offset=offset, key=key)

    def count(self, topic: str, timestamp_s: float) -> None:
        """Count one record of logical ``topic`` written at ``timestamp_s`` (epoch seconds) for its rate."""
        with self._lock:
            times = self.arrivals.setdefault(topic, deque())
            times.append(timestamp_s)
            _forget_before(times, timestamp_s - RATE_WINDOW_S)  # bounded even if nobody asks

    def record_lag(self, group: str, topic: str, lag: int, members: int, measured_at: float) -> None:
        """Store a consumer group's lag on ``topic`` as measured at ``measured_at`` (epoch seconds)."""
        with self._lock:
            self.lags[(group, topic)] = {"group": group, "topic": topic, "lag": lag, "consumers": members,
                                         "measured_at": measured_at}

    def _collection(self, value: dict) -> CollectionView:
        key = run_id(value["dcid"], value.get("processing_job_id"))
        entry = self.collections.get(key)
        if entry is None:
            entry = self.collections[key] = CollectionView(value["dcid"], value.get("processing_job_id"))
        entry.updated = time.time()
        return entry

    def _on_CollectionStarted(self, value: dict, **_: Any) -> None:  # noqa: N802 (named after the record)
        entry = self._collection(value)
        entry.experiment_type = value["experiment_type"]
        entry.beamline = value["beamline"]
        entry.file_template = value["file_template"]
        entry.images_expected = value["number_of_images"]
        entry.start_image_number = value["start_image_number"]
        entry.grid = dict(value["grid"]) if value["grid"] else None
        entry.started_at = value["event_time"]

    def _on_CollectionEnded(self, value: dict, **_: Any) -> None:  # noqa: N802
        entry = self._collection(value)
        entry.ended_at = value["event_time"]
        entry.end_status = value["status"]

    def _on_ImageResult(self, value: dict, **_: Any) -> None:  # noqa: N802
        entry = self._collection(value)
        # A redelivered or replayed result for the same image replaces, never adds.
        entry.spots[value["image_number"]] = value["n_spots_no_ice"]
        entry.d_min[value["image_number"]] = value["estimated_d_min"]

    def _on_CollectionProgress(self, value: dict, **_: Any) -> None:  # noqa: N802
        entry = self._collection(value)
        entry.announced = max(entry.announced, value["images_analysed"])
        entry.images_expected = entry.images_expected or value["images_expected"]

    def _on_CollectionSummary(self, value: dict, **_: Any) -> None:  # noqa: N802
        entry = self._collection(value)
        entry.summary = value
        entry.images_expected = value["images_expected"]
        if entry.experiment_type == "unknown":
            entry.experiment_type = value["experiment_type"]

    def _on_ServiceHeartbeat(self, value: dict, **_: Any) -> None:  # noqa: N802
        self.services[value["service_id"]] = value

    def _on_DeadLetter(self, value: dict, partition: int, offset: int, **_: Any) -> None:  # noqa: N802
        dead_id = f"{partition}:{offset}"
        self.dead_letters[dead_id] = {
            "id": dead_id, "partition": partition, "offset": offset, "failed_at": _iso(value["failed_at"]),
            "service": value["service"], "source_topic": value["source_topic"], "dcid": value["dcid"],
            "image_number": value["image_number"], "reason": value["reason"], "error_type": value["error_type"],
            "attempts": value["attempts"], "reinjected_count": value["reinjected_count"],
        }
        while len(self.dead_letters) > MAX_DEAD_LETTERS:
            self.dead_letters.popitem(last=False)

    def _on_MonitorEvent(self, value: dict, **_: Any) -> None:  # noqa: N802
        event = {k: _iso(v) for k, v in value.items()}
        self.monitor_status[value["monitor_id"]] = event
        if value["kind"] != "status":
            self.monitor_events.append(event)

    def _on_DeadLetterResolved(self, value: dict, key: bytes | None = None, **_: Any) -> None:  # noqa: N802
        dead_id = (key or b"").decode(errors="replace") or \
            f"{value['dead_letter_partition']}:{value['dead_letter_offset']}"
        self.resolutions[dead_id] = value

    # -- answers ---------------------------------------------------------------------
    def collection_rows(self) -> list[dict]:
        """Every collection run, the most recently active first."""
        with self._lock:
            entries = sorted(self.collections.values(), key=lambda e: e.updated, reverse=True)
            return [e.row() for e in entries]

    def collection_detail(self, dcid: int, processing_job_id: int | None = None) -> dict | None:
        """One run of a collection: the named reprocessing job, else the live run, else the latest run."""
        with self._lock:
            if processing_job_id is not None:
                entry = self.collections.get(run_id(dcid, processing_job_id))
            else:
                entry = self.collections.get(run_id(dcid, None)) or max(
                    (e for e in self.collections.values() if e.dcid == dcid), key=lambda e: e.updated, default=None)
            return entry.detail() if entry else None

    def service_rows(self, now: float | None = None) -> list[dict]:
        """The latest heartbeat of every service, with its age and whether it is stale."""
        now = time.time() if now is None else now
        with self._lock:
            rows = []
            for service_id, beat in sorted(self.services.items()):
                age = now - beat["sent_at"].timestamp()
                status = beat["status"] if beat["status"] != "running" or age <= STALE_AFTER_S else "stale"
                rows.append({
                    "service_id": service_id, "service_type": beat["service_type"], "host": beat["host"],
                    "pid": beat["pid"], "status": status, "version": beat["version"],
                    "started_at": _iso(beat["started_at"]), "sent_at": _iso(beat["sent_at"]),
                    "age_s": round(age, 1), "stats": dict(beat["stats"]),
                })
            return rows

    def dead_letter_rows(self) -> list[dict]:
        """Retained dead letters seen, newest first, each with its resolution if it was reinjected."""
        with self._lock:
            rows = []
            for dead_id, row in reversed(self.dead_letters.items()):
                marker = self.resolutions.get(dead_id)
                resolution = None if marker is None else {
                    "action": marker["action"], "by": marker["resolved_by"],
                    "at": _iso(marker["resolved_at"]),
                    "target": f"{marker['target_topic']}[{marker['target_partition']}]@{marker['target_offset']}",
                }
                rows.append({**row, "resolution": resolution})
            return rows

    def pipeline(self, now: float | None = None) -> dict:
        """Message rates per topic, consumer lag per group and topic, and the process monitor's word."""
        now = time.time() if now is None else now
        with self._lock:
            rates = []
            for topic, times in sorted(self.arrivals.items()):
                _forget_before(times, now - RATE_WINDOW_S)
                recent = sum(1 for t in times if now - RATE_WINDOW_S <= t <= now)
                rates.append({"topic": topic, "records_last_window": recent,
                              "per_second": round(recent / RATE_WINDOW_S, 2)})
            lags = [{**row, "age_s": round(now - row["measured_at"], 1)}
                    for _, row in sorted(self.lags.items())]
            return {"window_s": RATE_WINDOW_S, "rates": rates, "lags": lags,
                    "monitors": [self.monitor_status[m] for m in sorted(self.monitor_status)],
                    "monitor_events": list(reversed(self.monitor_events))}

    def has_dead_letter(self, dead_id: str) -> bool:
        with self._lock:
            return dead_id in self.dead_letters


def _forget_before(times: deque[float], cutoff: float) -> None:
    """Drop timestamps older than ``cutoff`` from the front (records arrive roughly in time order)."""
    while times and times[0] < cutoff:
        times.popleft()
