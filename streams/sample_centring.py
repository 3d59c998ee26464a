"""Per-sample state: the latest grid-scan centre in each plane, and the 3D centre of a pair.

Pure functions over a JSON record; no Kafka. A SampleCentre is produced once
for each (xy scan, xz scan) pair, whichever of the two finishes last.
"""

from __future__ import annotations

import json
from datetime import datetime

from beamstream.diffraction.centring import combine_orthogonal

PLANES = ("xy", "xz")


def empty_state() -> dict:
    """A sample with no grid centres yet."""
    return {"planes": {}, "published": []}


def load(data: bytes | None) -> dict:
    return json.loads(data) if data else empty_state()


def dump(state: dict) -> bytes:
    return json.dumps(state, separators=(",", ":"), sort_keys=True).encode()


def record_grid_summary(state: dict, summary: dict, event_time: datetime) -> dict | None:
    """Fold a grid scan's CollectionSummary in; returns a SampleCentre value when this
    completes an orthogonal pair not published before, else None."""
    plane = summary.get("grid_plane")
    centre = summary.get("xray_centre")
    if plane not in PLANES or centre is None or summary.get("sample_id") is None:
        return None
    state["planes"][plane] = {"dcid": summary["dcid"], "u": centre["centre_x_mm"], "v": centre["centre_y_mm"]}
    if not all(p in state["planes"] for p in PLANES):
        return None
    xy, xz = state["planes"]["xy"], state["planes"]["xz"]
    pair = [xy["dcid"], xz["dcid"]]
    if pair in state["published"]:
        return None
    state["published"].append(pair)
    x, y, z = combine_orthogonal((xy["u"], xy["v"]), (xz["u"], xz["v"]))
    return {"sample_id": summary["sample_id"], "x_mm": x, "y_mm": y, "z_mm": z,
            "xy_dcid": xy["dcid"], "xz_dcid": xz["dcid"], "event_time": event_time}
