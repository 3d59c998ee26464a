"""What staff can do from the dashboard, on top of the command-line tools' own functions.

Each action is blocking (Kafka transactions, database reads); the web layer runs it
in a thread. Failures are :class:`ActionError` carrying the HTTP status and a reason
meant for people.
"""

from __future__ import annotations

import importlib.util
import time

from beamstream.errors import BeamstreamError
from beamstream.platform.settings import Settings


class ActionError(Exception):
    """An action that could not be done: HTTP ``status`` and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def reinject_dead_letter(settings: Settings, dead_id: str, requested_by: str) -> dict:
    """Reinject dead letter ``partition:offset`` with the dead-letter tools (beamstream/engine/dead_letter_store.py);
    its resolution marker names ``requested_by``.

    404 when there is no such dead letter, 409 when it cannot be (or already was) reinjected.
    """
    from beamstream.engine import dead_letter_store as dlq

    scan = _read_dead_letters(settings)
    try:
        scan.find([dead_id])
    except dlq.DeadLetterError as exc:
        raise ActionError(404, str(exc)) from None
    try:
        todo, skipped = dlq.select(scan, [dead_id])
    except dlq.DeadLetterError as exc:  # it does not decode: nothing to put back
        raise ActionError(409, str(exc)) from None
    if not skipped and todo:
        done, skipped = dlq.reinject(settings, todo, resolved_by=requested_by)
        if done:
            return {"id": dead_id, "target": done[0].target, "reinjected_count": done[0].reinjected_count}
    marker = skipped[0].resolution or {}
    target = f"{marker.get('target_topic')}[{marker.get('target_partition')}]@{marker.get('target_offset')}"
    raise ActionError(409, f"dead letter {dead_id} was already reinjected (as {target}, by "
                           f"{marker.get('resolved_by', 'someone')})")


def _read_dead_letters(settings: Settings, tries: int = 3):
    """The dead-letter topic as read now; transient broker answers (a leader moving) are retried, then 503."""
    from beamstream.engine import dead_letter_store as dlq

    for attempt in range(1, tries + 1):
        try:
            return dlq.read_dead_letters(settings)
        except dlq.DeadLetterError:
            raise
        except BeamstreamError as exc:
            if attempt == tries:
                raise ActionError(503, f"the dead-letter topic cannot be read now: {exc}") from None
            time.sleep(attempt)


def reprocessing_available() -> bool:
    """True when the reprocessing producer (producers/go.py) is installed."""
    return importlib.util.find_spec("beamstream.producers.go") is not None


def reprocess_collection(settings: Settings, dcid: int, parameters: dict[str, str], requested_by: str) -> dict:
    """Reprocess collection ``dcid`` as ``beamstream go`` does: register a ProcessingJob, replay the images.

    501 when reprocessing is not installed, 400 for bad parameters, 404 for a collection
    ISPyB does not know (or cannot reprocess), 503 when the database is unreachable.
    """
    if not reprocessing_available():
        raise ActionError(501, "reprocessing is not available in this installation (producers/go.py is missing)")
    from beamstream.connectors.ispyb_collections import CollectionError, DatabaseError
    from beamstream.connectors.ispyb_schema import make_engine
    from beamstream.producers import go

    try:
        params = go.parse_parameters([f"{k}={v}" for k, v in parameters.items()])
    except (go.GoError, CollectionError) as exc:
        raise ActionError(400, str(exc)) from None
    engine = make_engine(settings.database_url)
    try:
        go_plan = go.plan(engine, dcid, params, requested_by=requested_by)
        job_id = go.run_go(settings, engine, go_plan)
    except (go.GoError, CollectionError) as exc:
        raise ActionError(404 if "no data collection" in str(exc) else 409, str(exc)) from None
    except DatabaseError as exc:
        raise ActionError(503, str(exc)) from None
    except BeamstreamError as exc:  # Kafka unreachable while publishing
        raise ActionError(503, str(exc)) from None
    finally:
        engine.dispose()
    return {"dcid": dcid, "processing_job_id": job_id, "images": len(go_plan.frames),
            "parameters": params, "run": f"{dcid}/{job_id}"}
