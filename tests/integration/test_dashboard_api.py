"""The dashboard's JSON API: reads are open, actions need the staff token, mistakes get a 4xx and a reason."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from datetime import UTC, datetime

import pytest
from aiohttp.test_utils import TestClient, TestServer

from beamstream.dashboard.auth import AuthError, authenticate
from beamstream.dashboard.view import DashboardView
from beamstream.dashboard.web import create_app
from beamstream.platform.settings import load_settings

DCID = 4242
GRID = {"rows": 2, "columns": 3, "step_x_um": 20.0, "step_y_um": 20.0, "origin_x_mm": 0.0, "origin_y_mm": 0.0,
        "snaked": True, "plane": "xy"}


def _filled_view() -> DashboardView:
    """A view as the feed would leave it after a 2x3 snaked grid scan, a heartbeat and a dead letter."""
    now = datetime.now(UTC)  # at call time: a heartbeat older than 20 s would show as stale
    view = DashboardView()
    view.apply("collections", "CollectionStarted", {
        "dcid": DCID, "processing_job_id": None, "experiment_type": "grid", "beamline": "i03",
        "number_of_images": 6, "start_image_number": 1, "file_template": "/data/x_####.cbf", "grid": GRID,
        "event_time": now})
    for image, spots in zip(range(1, 6), (1, 5, 9, 30, 12), strict=True):
        view.apply("results", "ImageResult", {"dcid": DCID, "processing_job_id": None, "image_number": image,
                                              "n_spots_no_ice": spots, "estimated_d_min": 2.5})
    view.apply("heartbeats", "ServiceHeartbeat", {
        "service_id": "worker-1", "service_type": "worker", "host": "h", "pid": 1, "status": "running",
        "version": "0.1.0", "started_at": now, "sent_at": now, "stats": {"images": 5.0}})
    view.apply("deadletter", "DeadLetter", {
        "reason": "no such file", "error_type": "ImageReadError", "service": "worker/images", "source_topic": "x",
        "source_partition": 0, "source_offset": 3, "key": b"4242", "payload": b"", "headers": [], "attempts": 3,
        "reinjected_count": 0, "dcid": DCID, "image_number": 6, "failed_at": now}, partition=1, offset=7)
    return view


def _call(settings, view, requests: list[tuple]) -> list[tuple[int, dict]]:
    """Run (method, path, headers, body) requests against the app; returns (status, JSON body) each."""
    async def go():
        async with TestClient(TestServer(create_app(settings, view))) as client:
            answers = []
            for method, path, *rest in requests:
                headers = rest[0] if rest else {}
                data = rest[1] if len(rest) > 1 else None
                response = await client.request(method, path, headers=headers, data=data)
                answers.append((response.status, await response.json()))
            return answers
    return asyncio.run(go())


@pytest.fixture
def offline(tmp_path):
    """Settings for tests that never reach Kafka (a closed port), with a staff token named ``alice``."""
    return load_settings(environ={}, bootstrap_servers="127.0.0.1:9", home=tmp_path,
                         dashboard_token="alice:s3cret-token")


def test_read_endpoints_answer_without_a_token(offline):
    [(s1, rows), (s2, detail), (s3, services), (s4, dead)] = _call(offline, _filled_view(), [
        ("GET", "/api/collections"), ("GET", f"/api/collections/{DCID}"), ("GET", "/api/services"),
        ("GET", "/api/deadletters")])
    assert (s1, s2, s3, s4) == (200, 200, 200, 200)
    assert rows[0]["dcid"] == DCID and rows[0]["state"] == "running" and rows[0]["images_analysed"] == 5
    # Snaked: image 4 is row 1, column 2 and image 6 (no result yet) row 1, column 0.
    assert detail["heat_map"] == [1, 5, 9, None, 12, 30]
    assert detail["summary"] is None
    assert services[0]["service_id"] == "worker-1" and services[0]["status"] == "running"
    assert dead[0]["id"] == "1:7" and dead[0]["resolution"] is None


def test_malformed_requests_get_a_4xx_with_a_reason(offline):
    bearer = {"Authorization": "Bearer s3cret-token"}
    answers = _call(offline, _filled_view(), [
        ("GET", "/api/collections/abc"),
        ("GET", "/api/collections/0"),
        ("GET", "/api/collections/99999999999999999999999"),
        ("GET", "/api/collections/777"),
        ("GET", f"/api/collections/{DCID}?job=x"),
        ("GET", "/api/nothing-here"),
        ("GET", "/api/deadletters/1:7/reinject"),
        ("POST", "/api/deadletters/not-an-id/reinject", bearer),
        ("POST", "/api/deadletters/1:7:8/reinject", bearer),
        ("POST", "/api/collections/abc/reprocess", bearer),
        ("POST", f"/api/collections/{DCID}/reprocess", {**bearer, "Content-Type": "application/json"}, "{not json"),
        ("POST", f"/api/collections/{DCID}/reprocess", {**bearer, "Content-Type": "application/json"}, "[1, 2]"),
    ])
    statuses = [status for status, _ in answers]
    assert statuses == [400, 400, 400, 404, 400, 404, 405, 400, 400, 400, 400, 400]
    reasons = [body["error"] for _, body in answers]
    assert "positive whole number, got 'abc'" in reasons[0]
    assert "no collection 777" in reasons[3]
    assert "no such endpoint" in reasons[5] and "GET is not allowed" in reasons[6]
    assert "partition:offset" in reasons[7] and "partition:offset" in reasons[8]
    assert "must be JSON" in reasons[10] and "must be an object" in reasons[11]


def test_actions_need_the_staff_token(offline, caplog):
    path = "/api/deadletters/1:7/reinject"
    caplog.set_level(logging.INFO, logger="beamstream.dashboard.web")
    answers = _call(offline, _filled_view(), [
        ("POST", path),
        ("POST", path, {"Authorization": "Basic YWxpY2U6eA=="}),
        ("POST", path, {"Authorization": "Bearer wrong"}),
        ("POST", f"/api/collections/{DCID}/reprocess"),
    ])
    assert [s for s, _ in answers] == [401, 401, 403, 401]
    assert "Bearer" in answers[0][1]["error"] and "not valid" in answers[2][1]["error"]
    refusals = [r for r in caplog.records if r.name == "beamstream.dashboard.web"]
    assert len(refusals) == 4 and all(r.who == "anonymous" and r.result == "refused" for r in refusals)
    assert {r.action for r in refusals} == {"reinject", "reprocess"}

    # Without any token configured the dashboard is read-only: actions are forbidden, reads still work.
    read_only = load_settings(environ={}, bootstrap_servers="127.0.0.1:9", home=offline.home)
    [(status, body), (read, _)] = _call(read_only, _filled_view(), [
        ("POST", path, {"Authorization": "Bearer s3cret-token"}), ("GET", "/api/deadletters")])
    assert status == 403 and "read-only" in body["error"] and read == 200


def test_tokens_from_a_file_name_their_holders(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# staff tokens\nbob:tok-bob\n\nbare-token\n")
    settings = load_settings(environ={}, home=tmp_path, dashboard_token_file=str(tokens))
    assert authenticate(settings, "Bearer tok-bob").name == "bob"
    assert authenticate(settings, "bearer bare-token").name == "staff"
    with pytest.raises(AuthError) as refused:
        authenticate(settings, "Bearer tok-bo")
    assert refused.value.status == 403
    tokens.write_text("")  # revoked by editing the file: re-read on every action
    with pytest.raises(AuthError, match="read-only"):
        authenticate(settings, "Bearer tok-bob")
    missing = load_settings(environ={}, home=tmp_path, dashboard_token_file=str(tmp_path / "absent"))
    with pytest.raises(AuthError) as unreadable:
        authenticate(missing, "Bearer x")
    assert unreadable.value.status == 503


@pytest.mark.kafka
def test_served_api_and_metrics_against_the_broker(kafka_settings):
    """The real server: reads open, an unknown dead letter is 404, /metrics is Prometheus text."""
    from beamstream.dashboard.server import DashboardServer

    settings = load_settings(environ={}, bootstrap_servers=kafka_settings.kafka_bootstrap, home=kafka_settings.home,
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4,
                             dashboard_token="carol:tok-c")
    with DashboardServer(settings, "127.0.0.1", 0) as server:
        def get(path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, bytes]:
            request = urllib.request.Request(server.url.rstrip("/") + path, method=method, headers=headers or {})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert get("/api/collections") == (200, b"[]")
        status, page = get("/")
        assert status == 200 and b"Beamstream" in page
        status, body = get("/api/deadletters/0:999/reinject", "POST", {"Authorization": "Bearer tok-c"})
        assert status == 404 and "no dead letter 0:999" in json.loads(body)["error"]
        status, text = get("/metrics")
        assert status == 200 and b"beamstream_topic_events" in text and b"beamstream_consumer_lag" in text


def test_pipeline_shows_rates_lag_and_the_monitor(offline):
    view = _filled_view()
    now = datetime.now(UTC)
    t = now.timestamp()
    for age in (200.0, 50.0, 30.0, 1.0):  # the first is outside the rate window
        view.count("images", t - age)
    view.count("results", t - 2.0)
    view.record_lag("analysis", "images", 12, 2, t - 3.0)
    monitor = {"monitor_id": "monitor@h:1", "workers": 1, "target_workers": 1, "lag": 0, "produce_rate_hz": 0.0,
               "consume_rate_hz": 0.0, "new_dead_letters": 0}
    view.apply("monitor", "MonitorEvent", {**monitor, "kind": "status", "code": "observed", "message": "steady",
                                           "event_time": now})
    view.apply("monitor", "MonitorEvent", {**monitor, "kind": "decision", "code": "scale_up", "message": "lag 900",
                                           "workers": 1, "target_workers": 3, "event_time": now})
    view.apply("monitor", "MonitorEvent", {**monitor, "kind": "status", "code": "observed", "message": "busy",
                                           "workers": 3, "target_workers": 3, "lag": 40, "event_time": now})
    [(status, body)] = _call(offline, view, [("GET", "/api/pipeline")])
    assert status == 200
    rates = {r["topic"]: r for r in body["rates"]}
    assert rates["images"]["records_last_window"] == 3 and rates["results"]["records_last_window"] == 1
    assert rates["images"]["per_second"] == round(3 / body["window_s"], 2)
    [lag] = body["lags"]
    assert (lag["group"], lag["topic"], lag["lag"], lag["consumers"]) == ("analysis", "images", 12, 2)
    assert lag["age_s"] >= 3.0
    # Routine observations update the monitor's status; only decisions and warnings are listed.
    [latest] = body["monitors"]
    assert latest["message"] == "busy" and latest["workers"] == 3
    assert [e["code"] for e in body["monitor_events"]] == ["scale_up"]
