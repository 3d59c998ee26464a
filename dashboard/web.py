"""The dashboard's web application (aiohttp): the page, its JSON API and ``/metrics``.

Reads are open; actions (``POST``) need a staff token (:mod:`dashboard.auth`) and are
logged as one JSON line each: who, what, on what, and how it went. Every API error is
JSON, ``{"error": reason}``, with a 4xx status for the caller's mistakes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from beamstream.dashboard import actions, kafka_routes
from beamstream.dashboard.auth import AuthError, Principal, authenticate
from beamstream.dashboard.view import DashboardView
from beamstream.errors import BeamstreamError
from beamstream.platform.settings import Settings
from beamstream.producers.spool import list_spools, spool_root

STATIC = Path(__file__).parent / "static"
_DEAD_ID = re.compile(r"^(\d{1,9}):(\d{1,19})$")
_MAX_DCID = 2**63 - 1  # dcids are Avro longs

log = logging.getLogger(__name__)
_VIEW: web.AppKey[DashboardView] = web.AppKey("view", DashboardView)
_SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("action_lock", asyncio.Lock)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(_finite(data), default=str), status=status, content_type="application/json")


def _finite(data: Any) -> Any:
    """``data`` with NaN and infinities as null: JSON has neither, and the browser's parser refuses the whole
    answer for one (a result's undefined resolution, a monitor's rate)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def _error(status: int, reason: str) -> web.Response:
    return _json({"error": reason}, status)


def _dcid(request: web.Request) -> int:
    """The ``{dcid}`` path part as a positive integer, else a 400 naming what was wrong."""
    raw = request.match_info["dcid"]
    if not raw.isdigit() or not 0 < int(raw) <= _MAX_DCID:
        raise web.HTTPBadRequest(reason=f"a dcid is a positive whole number, got {raw!r}")
    return int(raw)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Turn every error under /api into a JSON body with a reason (aiohttp's own are plain text)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        reason = exc.reason
        if getattr(request.match_info, "http_exception", None) is not None:  # no route matched
            reason = (f"{request.method} is not allowed on {request.path}" if exc.status == 405
                      else f"no such endpoint: {request.method} {request.path}")
        return _error(exc.status, reason)
    except Exception:
        logging.getLogger(__name__).exception("request failed", extra={"path": request.path})
        return _error(500, "internal error (see the dashboard's log)")


# -- reads ---------------------------------------------------------------------------
async def collections(request: web.Request) -> web.Response:
    return _json(request.app[_VIEW].collection_rows())


async def collection(request: web.Request) -> web.Response:
    dcid = _dcid(request)
    job = request.query.get("job")
    if job is not None and not job.isdigit():
        raise web.HTTPBadRequest(reason=f"job is a processing job id (a whole number), got {job!r}")
    detail = request.app[_VIEW].collection_detail(dcid, int(job) if job is not None else None)
    if detail is None:
        raise web.HTTPNotFound(reason=f"no collection {dcid}" + (f" job {job}" if job else "") + " has been seen")
    return _json(detail)


async def services(request: web.Request) -> web.Response:
    return _json(request.app[_VIEW].service_rows())


async def dead_letters(request: web.Request) -> web.Response:
    return _json(request.app[_VIEW].dead_letter_rows())


async def pipeline(request: web.Request) -> web.Response:
    # This host's producer spools (events Kafka does not have yet) are read from disk, off the event loop.
    root = spool_root(request.app[_SETTINGS])
    spools = await asyncio.get_running_loop().run_in_executor(None, list_spools, root)
    return _json({**request.app[_VIEW].pipeline(), "spools": [spool.as_dict() for spool in spools]})


async def health(request: web.Request) -> web.Response:
    view = request.app[_VIEW]
    return _json({"status": "ok", "records_read": view.records_read,
                  "reprocessing": actions.reprocessing_available()})


async def metrics_endpoint(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


# -- actions -------------------------------------------------------------------------
def _principal(request: web.Request, action: str, target: str) -> Principal:
    """The authenticated caller, or a logged refusal as the HTTP error."""
    try:
        return authenticate(request.app[_SETTINGS], request.headers.get("Authorization"))
    except AuthError as exc:
        _log_action("anonymous", action, target, "refused", exc.status, exc.reason, request)
        raise _http_error(exc.status, exc.reason) from None


def _http_error(status: int, reason: str) -> web.HTTPException:
    error = web.HTTPException(reason=reason)
    error.set_status(status, reason)
    return error


def _log_action(who: str, action: str, target: str, result: str, status: int, detail: str,
                request: web.Request) -> None:
    log.info("%s %s: %s", action, target, result, extra={
        "who": who, "action": action, "target": target, "result": result, "status": status, "detail": detail,
        "remote": request.remote})


async def _act(request: web.Request, principal: Principal, action: str, target: str, work) -> web.Response:
    """Run blocking ``work`` in a thread (one action at a time), log it, answer with its result or reason."""
    async with request.app[_LOCK]:
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, work)
        except actions.ActionError as exc:
            _log_action(principal.name, action, target, "failed", exc.status, exc.reason, request)
            return _error(exc.status, exc.reason)
        except BeamstreamError as exc:  # Kafka or the database unreachable mid-action: try again later
            _log_action(principal.name, action, target, "failed", 503, str(exc), request)
            return _error(503, str(exc))
        except Exception as exc:
            log.exception("%s %s failed", action, target, extra={"who": principal.name, "action": action,
                                                                  "target": target, "result": "error"})
            return _error(500, f"{action} failed: {exc}")
    _log_action(principal.name, action, target, "ok", 200, json.dumps(result, default=str), request)
    return _json({"ok": True, "by": principal.name, **result})


async def reinject(request: web.Request) -> web.Response:
    dead_id = request.match_info["dead_id"]
    principal = _principal(request, "reinject", dead_id)
    if not _DEAD_ID.match(dead_id):
        raise web.HTTPBadRequest(reason=f"a dead letter is named partition:offset (e.g. 0:42), got {dead_id!r}")
    settings = request.app[_SETTINGS]
    return await _act(request, principal, "reinject", dead_id,
                      lambda: actions.reinject_dead_letter(settings, dead_id, principal.name))


async def reprocess(request: web.Request) -> web.Response:
    raw = request.match_info["dcid"]
    principal = _principal(request, "reprocess", raw)
    dcid = _dcid(request)
    parameters: dict[str, str] = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(reason="the body must be JSON, e.g. {\"parameters\": {\"d_min\": \"2.0\"}}") \
                from None
        if not isinstance(body, dict) or not isinstance(body.get("parameters", {}), dict):
            raise web.HTTPBadRequest(reason="the body must be an object with an optional 'parameters' object")
        parameters = {str(k): str(v) for k, v in body.get("parameters", {}).items()}
    settings = request.app[_SETTINGS]
    return await _act(request, principal, "reprocess", str(dcid),
                      lambda: actions.reprocess_collection(settings, dcid, parameters, principal.name))


def create_app(settings: Settings, view: DashboardView) -> web.Application:
    """The dashboard application over ``view`` (fed elsewhere) with ``settings`` for actions."""
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024)
    app[_VIEW], app[_SETTINGS], app[_LOCK] = view, settings, asyncio.Lock()
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/collections", collections)
    app.router.add_get("/api/collections/{dcid}", collection)
    app.router.add_post("/api/collections/{dcid}/reprocess", reprocess)
    app.router.add_get("/api/services", services)
    app.router.add_get("/api/deadletters", dead_letters)
    app.router.add_get("/api/pipeline", pipeline)
    app.router.add_post("/api/deadletters/{dead_id}/reinject", reinject)
    kafka_routes.add_routes(app, settings, _json)  # the read-only Kafka views: GET /api/kafka/...
    return app
