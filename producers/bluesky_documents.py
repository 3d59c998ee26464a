"""Bluesky run documents as Beamstream events: a pure translator, one document at a time.

A bluesky run (event-model documents: ``start``, ``descriptor``, ``stream_resource``,
``stream_datum``, ``event``, ``stop``) becomes one collection:

=====================  ===================================================================================
document               events
=====================  ===================================================================================
``start``              none yet; the run's metadata is checked and kept (dcid, grid, detector)
``descriptor``         none; its data keys are kept (which one holds the detector's images, motor units)
``stream_resource``    the first one of the detector's images: ``CollectionStarted`` (file_template: the
                       resource's file, the grid in mm and um from the start's extents and the motors' units)
``stream_datum``       one ``ImageArrived`` per frame of the detector's images: file_path the resource's file,
                       frame_index the datum's index, image_number the frame's place in the run (1-based)
``event``              none (its descriptor must be known)
``stop``               ``CollectionEnded``: images_collected, status from exit_status (success, aborted, failed)
=====================  ===================================================================================

The start's metadata (``RE(plan, md={...})`` or the plan's own) says what the collection is:

* ``dcid`` (required): the ISPyB data collection id, a positive integer. The plan knows it: it waits
  for the collection's summary by it (:mod:`beamstream.producers.bluesky_plans`).
* the grid: ``bluesky.plans.grid_scan``'s own ``shape``, ``extents``, ``snaking`` and ``motors`` (the first
  motor the rows, the second the columns; extents in the motors' units, mm unless their descriptor data key
  says ``um``, ``nm`` or ``m``), or an explicit ``grid`` dict with the CollectionStarted GridScan fields
  (``rows``, ``columns``, ``step_x_um``, ``step_y_um``, optional ``origin_x_mm``, ``origin_y_mm``,
  ``snaked``, ``plane``). ``grid_plane`` (``xy`` or ``xz``) names the plane of a grid_scan.
* ``detector``: the name of the detector whose images Beamstream analyses (default: the run's only
  detector); ``experiment_type`` (default ``grid`` with a grid, else ``other``); ``number_of_images``
  without a grid (default the plan's ``num_points``); ``beamline`` (or ``beamline_id``); ``sample_id``.

Anything that cannot be translated raises :class:`DocumentError` whose message is the one-line reason.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import unquote, urlparse

from beamstream.errors import BeamstreamError
from beamstream.platform.settings import path_within_roots
from beamstream.producers.events import Event, EventError, collection_ended, collection_started, image_arrived

#: Millimetres per motor unit (a descriptor data key's ``units``); motors without units are taken as mm.
MM_PER_UNIT = {"mm": 1.0, "um": 1e-3, "µm": 1e-3, "micron": 1e-3, "microns": 1e-3, "nm": 1e-6, "m": 1000.0}
#: A stop document's exit_status as CollectionEnded's status.
STATUS = {"success": "success", "abort": "aborted", "fail": "failed"}
EXPERIMENT_TYPES = ("grid", "rotation", "serial", "other")
#: What ImageArrived's ``source`` says for images announced from bluesky documents.
SOURCE = "bluesky"
#: Documents that carry nothing Beamstream needs (old-style file references, pages of other documents).
_IGNORED = {"resource", "datum", "datum_page", "bulk_datum", "bulk_events"}
_MAX_DCID = 2**63 - 1


class DocumentError(BeamstreamError, ValueError):
    """A document that cannot be translated; str(exc) is the one-line reason (a dead letter's reason)."""


@dataclass
class RunState:
    """Everything known of one run so far (start, descriptors, stream resources, images announced)."""

    run_uid: str
    dcid: int
    detector: str
    experiment_type: str
    number_of_images: int
    beamline: str = ""
    sample_id: int | None = None
    #: The grid as the start gives it: an explicit GridScan (``fields``) or a grid_scan's shape, extents (motor
    #: units), snaking and motors, turned into mm and um when the collection starts.
    grid_spec: dict | None = None
    #: Descriptor uid -> {"stream": name, "image_key": the detector's image data key or None, "units": {key: units}}.
    descriptors: dict[str, dict] = field(default_factory=dict)
    #: Stream resource uid -> {"data_key", "path" (None: not the detector's images), "base", "next"}: image
    #: numbers of its frames start after ``base``; frames below ``next`` are announced already.
    resources: dict[str, dict] = field(default_factory=dict)
    #: The GridScan of the published CollectionStarted (None before it, or without a grid).
    grid: dict | None = None
    file_template: str | None = None
    started: bool = False
    images: int = 0

    def to_json(self) -> bytes:
        """The state as JSON (the bridge keeps it in a changelog table)."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunState:
        """A state written by :meth:`to_json`; :class:`DocumentError` when ``data`` is not one."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise DocumentError(f"not a saved bluesky run state: {exc}") from None


def translate(state: RunState | None, name: str, doc: dict, *, data_roots: Sequence[str] = ()
              ) -> tuple[RunState | None, list[Event]]:
    """The events one document means, and the run's state after it. `state` is None before a run's
    'start'; the returned state is None after its 'stop'. Raises DocumentError for a document that
    cannot be translated (e.g. an event or stream_datum whose descriptor was never seen, an unknown
    detector, a file path outside data_roots, a 'start' without the metadata a collection needs);
    the state passed in is then still valid for the next document."""
    if not isinstance(doc, dict):
        raise DocumentError(f"{name} document is a {type(doc).__name__}, not a dict")
    if name == "start":
        if state is not None:
            raise DocumentError(f"start of run {doc.get('uid')} while run {state.run_uid} (dcid {state.dcid}) "
                                "is still open")
        return _checked(_start, doc, name, "run"), []
    if state is None:
        raise DocumentError(f"{name} {_uid(doc)} before its run's start")
    if name in _IGNORED:
        return state, []
    handler = _HANDLERS.get(name)
    if handler is None:
        raise DocumentError(f"run {state.run_uid}: unknown document type {name!r}")
    state = copy.deepcopy(state)  # changed only when the whole document translates
    try:
        events = _checked(lambda d: handler(state, d, tuple(data_roots)), doc, name, f"run {state.run_uid}")
    except EventError as exc:
        raise DocumentError(f"run {state.run_uid} (dcid {state.dcid}): {exc}") from None
    return (None if name == "stop" else state), events


def _checked(handle, doc: dict, name: str, where: str):
    """``handle(doc)``, with a document lacking a field or holding one of the wrong type as a DocumentError."""
    try:
        return handle(doc)
    except (EventError, DocumentError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DocumentError(f"{where}: {name} {_uid(doc)} is malformed: {type(exc).__name__} {exc}") from None


# -- start ---------------------------------------------------------------------------------------------
def _start(doc: dict) -> RunState:
    uid = doc.get("uid")
    if not isinstance(uid, str) or not uid:
        raise DocumentError("start document without a uid")
    where = f"start {uid}"
    dcid = _dcid(doc.get("dcid"), where)
    detector = _detector(doc, where)
    grid_spec = _grid_spec(doc, where)
    experiment_type = doc.get("experiment_type", "grid" if grid_spec else "other")
    if experiment_type not in EXPERIMENT_TYPES:
        raise DocumentError(f"{where}: experiment_type {experiment_type!r} is not one of {', '.join(EXPERIMENT_TYPES)}")
    if experiment_type == "grid" and grid_spec is None:
        raise DocumentError(f"{where}: a grid scan needs its grid: run bluesky.plans.grid_scan (shape, extents) "
                            "or give md 'grid' with rows, columns, step_x_um, step_y_um")
    if grid_spec is not None:
        images = grid_spec["rows"] * grid_spec["columns"]
    else:
        images = _positive_int(doc.get("number_of_images", doc.get("num_points")), f"{where}: number_of_images")
    sample_id = doc.get("sample_id")
    if sample_id is not None:
        sample_id = _positive_int(sample_id, f"{where}: sample_id")
    beamline = doc.get("beamline", doc.get("beamline_id", ""))
    return RunState(run_uid=uid, dcid=dcid, detector=detector, experiment_type=experiment_type,
                    number_of_images=images, beamline=str(beamline or ""), sample_id=sample_id,
                    grid_spec=grid_spec)


def _dcid(value, where: str) -> int:
    if value is None:
        raise DocumentError(f"{where}: no 'dcid' in the run's metadata (the ISPyB data collection id Beamstream "
                            "files the images under)")
    dcid = _positive_int(value, f"{where}: dcid")
    if dcid > _MAX_DCID:
        raise DocumentError(f"{where}: dcid {dcid} is too large")
    return dcid


def _positive_int(value, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DocumentError(f"{what} must be a positive integer, got {value!r}")
    return value


def _detector(doc: dict, where: str) -> str:
    detectors = doc.get("detectors")
    named = doc.get("detector")
    if named is not None:
        if not isinstance(named, str) or not named:
            raise DocumentError(f"{where}: md 'detector' must name a detector, got {named!r}")
        if isinstance(detectors, list | tuple) and named not in detectors:
            raise DocumentError(f"{where}: unknown detector {named!r} (the run's detectors are "
                                f"{', '.join(map(str, detectors)) or 'none'})")
        return named
    if isinstance(detectors, list | tuple) and len(detectors) == 1 and isinstance(detectors[0], str):
        return detectors[0]
    found = ", ".join(map(str, detectors)) if isinstance(detectors, list | tuple) and detectors else "none"
    raise DocumentError(f"{where}: name the detector whose images Beamstream analyses in md 'detector' "
                        f"(the run's detectors: {found})")


_GRID_FIELDS = ("rows", "columns", "step_x_um", "step_y_um")


def _grid_spec(doc: dict, where: str) -> dict | None:
    explicit = doc.get("grid")
    if explicit is not None:
        fields = _explicit_grid(explicit, where)
        return {"rows": fields["rows"], "columns": fields["columns"], "fields": fields}
    shape, extents = doc.get("shape"), doc.get("extents")
    if shape is None or extents is None:
        return None
    if str(doc.get("plan_name", "")).startswith("rel_"):
        raise DocumentError(f"{where}: {doc['plan_name']} gives extents relative to where the motors were; "
                            "give the grid's origin in md 'grid' (origin_x_mm, origin_y_mm ...) or use grid_scan")
    if not (_pair(shape) and _pair(extents) and all(_pair(e) for e in extents)):
        raise DocumentError(f"{where}: a grid needs a 2-D shape and extents (rows motor, then columns motor), "
                            f"got shape {shape!r}, extents {extents!r}")
    rows, columns = (_positive_int(n, f"{where}: grid shape") for n in shape)
    bounds = [[_number(v, f"{where}: extents") for v in pair] for pair in extents]
    snaking = doc.get("snaking") or (False, False)
    motors = doc.get("motors") or ("", "")
    plane = doc.get("grid_plane", "xy")
    if plane not in ("xy", "xz"):
        raise DocumentError(f"{where}: grid_plane must be xy or xz, got {plane!r}")
    return {"rows": rows, "columns": columns, "extents": bounds,
            "snaked": bool(snaking[1]) if _pair(snaking) else bool(snaking),
            "motors": [str(m) for m in motors][:2] if _pair(motors) else ["", ""], "plane": plane}


def _explicit_grid(grid, where: str) -> dict:
    if not isinstance(grid, dict):
        raise DocumentError(f"{where}: md 'grid' must be a dict of GridScan fields, got {type(grid).__name__}")
    missing = [name for name in _GRID_FIELDS if name not in grid]
    if missing:
        raise DocumentError(f"{where}: md 'grid' lacks {', '.join(missing)}")
    plane = grid.get("plane", "xy")
    if plane not in ("xy", "xz"):
        raise DocumentError(f"{where}: grid plane must be xy or xz, got {plane!r}")
    return {"rows": _positive_int(grid["rows"], f"{where}: grid rows"),
            "columns": _positive_int(grid["columns"], f"{where}: grid columns"),
            "step_x_um": _number(grid["step_x_um"], f"{where}: step_x_um"),
            "step_y_um": _number(grid["step_y_um"], f"{where}: step_y_um"),
            "origin_x_mm": _number(grid.get("origin_x_mm", 0.0), f"{where}: origin_x_mm"),
            "origin_y_mm": _number(grid.get("origin_y_mm", 0.0), f"{where}: origin_y_mm"),
            "snaked": bool(grid.get("snaked", False)), "plane": plane}


def _pair(value) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DocumentError(f"{what} must be a finite number, got {value!r}")
    return float(value)


# -- descriptor, stream_resource, stream_datum, event, stop --------------------------------------------
def _descriptor(state: RunState, doc: dict, roots: tuple[str, ...]) -> list[Event]:
    uid = doc["uid"]
    _same_run(state, doc, f"descriptor {uid}")
    data_keys = doc["data_keys"]
    own = doc.get("object_keys", {}).get(state.detector) or [k for k in data_keys if k == state.detector]
    images = [key for key in own if key in data_keys and data_keys[key].get("external")
              and len(data_keys[key].get("shape") or ()) >= 2]
    state.descriptors[uid] = {
        "stream": doc.get("name", ""),
        # ophyd-async names the image key after the detector (its other keys are sums, stats ...).
        "image_key": state.detector if state.detector in images else (images[0] if images else None),
        "keys": sorted(data_keys),
        "units": {key: data_keys[key]["units"] for key in data_keys if data_keys[key].get("units")},
    }
    return []


def _stream_resource(state: RunState, doc: dict, roots: tuple[str, ...]) -> list[Event]:
    uid, data_key = doc["uid"], doc["data_key"]
    where = f"stream_resource {uid}"
    if doc.get("run_start") is not None:
        _same_run(state, doc, where)
    if uid in state.resources:
        return []  # seen already (the same document again)
    if not any(data_key in d["keys"] for d in state.descriptors.values()):
        raise DocumentError(f"run {state.run_uid}: {where} is for unknown detector data key {data_key!r}: no "
                            "descriptor of the run describes it")
    if not any(d["image_key"] == data_key for d in state.descriptors.values()):
        state.resources[uid] = {"data_key": data_key, "path": None, "base": 0, "next": 0}
        return []  # another device's data, or the detector's sums and statistics
    path = _resource_path(doc, where, state)
    if not path_within_roots(path, roots):
        raise DocumentError(f"run {state.run_uid} (dcid {state.dcid}): {where}: {path} is outside the data roots "
                            f"({', '.join(roots)}); workers would refuse its images")
    state.resources[uid] = {"data_key": data_key, "path": path, "base": state.images, "next": 0}
    if state.started:
        return []
    state.grid = _grid(state)
    state.file_template, state.started = path, True
    return [collection_started(
        state.dcid, file_template=path, number_of_images=state.number_of_images,
        experiment_type=state.experiment_type, beamline=state.beamline, grid=state.grid,
        sample_id=state.sample_id)]


def _resource_path(doc: dict, where: str, state: RunState) -> str:
    """The file a stream resource names: its ``uri`` (file://host/path), or the older ``root`` + ``resource_path``."""
    uri = doc.get("uri")
    if uri is None and "resource_path" in doc:
        path = "/".join(p.strip("/") for p in (doc.get("root") or "/", doc["resource_path"]) if p.strip("/"))
        path = "/" + path
    else:
        parsed = urlparse(str(uri))
        if parsed.scheme not in ("file", ""):
            raise DocumentError(f"run {state.run_uid}: {where}: uri {uri!r} is not a file (file://...)")
        path = unquote(parsed.path)
    if not path.startswith("/"):
        raise DocumentError(f"run {state.run_uid}: {where}: file path {path!r} is not absolute")
    return path


def _grid(state: RunState) -> dict | None:
    """The CollectionStarted GridScan: explicit, or from the grid_scan's extents in the motors' units."""
    spec = state.grid_spec
    if spec is None:
        return None
    if "fields" in spec:
        return dict(spec["fields"])
    units = {}
    for descriptor in state.descriptors.values():
        units.update(descriptor["units"])
    scale = []
    for motor in spec["motors"]:
        unit = units.get(motor, "mm")
        if unit not in MM_PER_UNIT:
            raise DocumentError(f"run {state.run_uid}: motor {motor} moves in {unit!r}; Beamstream knows "
                                f"{', '.join(MM_PER_UNIT)}")
        scale.append(MM_PER_UNIT[unit])
    (y0, y1), (x0, x1) = spec["extents"]
    rows, columns = spec["rows"], spec["columns"]
    step_y = (y1 - y0) / (rows - 1) if rows > 1 else 0.0
    step_x = (x1 - x0) / (columns - 1) if columns > 1 else 0.0
    return {"rows": rows, "columns": columns, "step_x_um": step_x * scale[1] * 1000.0,
            "step_y_um": step_y * scale[0] * 1000.0, "origin_x_mm": x0 * scale[1], "origin_y_mm": y0 * scale[0],
            "snaked": spec["snaked"], "plane": spec["plane"]}


def _stream_datum(state: RunState, doc: dict, roots: tuple[str, ...]) -> list[Event]:
    uid = doc["uid"]
    where = f"stream_datum {uid}"
    _known_descriptor(state, doc["descriptor"], where)
    resource = state.resources.get(doc["stream_resource"])
    if resource is None:
        raise DocumentError(f"run {state.run_uid}: {where} refers to stream_resource {doc['stream_resource']}, "
                            "never seen (missing stream_resource)")
    if resource["path"] is None:
        return []
    start, stop = int(doc["indices"]["start"]), int(doc["indices"]["stop"])
    if start < 0 or stop < start:
        raise DocumentError(f"run {state.run_uid}: {where} has indices {start}..{stop}")
    first = max(start, resource["next"])  # frames below were announced already (a document seen again)
    last_number = resource["base"] + stop
    if stop > first and last_number > state.number_of_images:
        raise DocumentError(f"run {state.run_uid} (dcid {state.dcid}): {where}: image {last_number} is beyond "
                            f"the collection's {state.number_of_images} images")
    events = [image_arrived(state.dcid, resource["base"] + index + 1, resource["path"], index, source=SOURCE)
              for index in range(first, stop)]
    resource["next"] = max(resource["next"], stop)
    state.images += len(events)
    return events


def _event(state: RunState, doc: dict, roots: tuple[str, ...]) -> list[Event]:
    _known_descriptor(state, doc["descriptor"], f"event {_uid(doc)}")
    return []


def _stop(state: RunState, doc: dict, roots: tuple[str, ...]) -> list[Event]:
    _same_run(state, doc, f"stop {doc['uid']}")
    status = STATUS.get(doc.get("exit_status", "success"), "failed")
    if not state.started:
        return []  # no image ever announced: nothing to end
    return [collection_ended(state.dcid, state.images, status)]


def _known_descriptor(state: RunState, descriptor: str, where: str) -> None:
    if descriptor not in state.descriptors:
        raise DocumentError(f"run {state.run_uid}: {where} refers to descriptor {descriptor}, never seen "
                            "(missing descriptor)")


def _same_run(state: RunState, doc: dict, where: str) -> None:
    if doc.get("run_start") != state.run_uid:
        raise DocumentError(f"{where} belongs to run {doc.get('run_start')}, not the open run {state.run_uid}")


def _uid(doc: dict) -> str:
    return str(doc.get("uid", "(no uid)"))


_HANDLERS = {"descriptor": _descriptor, "stream_resource": _stream_resource, "stream_datum": _stream_datum,
             "event": _event, "event_page": _event, "stop": _stop}
