"""ISPyB sink faults on real processes: the sink SIGKILLed between its database commit and its Kafka commit,
and MariaDB SIGKILLed while the sink writes.

Each runs `beamstream ispyb-sink` on a real broker and the session's MariaDB, then checks that the database
holds exactly one row per image with the right values, one processing run per collection, and that the
sink's offsets reached the end of its topics. Each records what it counted with
:func:`tests.helpers.faults.record_fault`.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from beamstream.connectors.ispyb_collections import create_collection
from beamstream.connectors.ispyb_sink import FAULT_KILL_ENV
from beamstream.platform.processes import alive
from beamstream.platform.settings import Settings
from tests.helpers.faults import record_fault
from tests.helpers.harness import ServiceProcess
from tests.helpers.ispyb_helpers import (
    committed_offsets,
    end_offsets,
    fresh_database,
    messages_committed,
    publish,
    result,
    scalar,
    stream,
    summary,
    wait_until,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.fault]


@pytest.fixture
def maria(mariadb_url):
    """A database of this test's own on the session's MariaDB, with the ISPyB schema."""
    engine = fresh_database(mariadb_url)
    yield engine
    engine.dispose()


def sink_process(settings: Settings, log_dir, engine: Engine, name: str, *args: str, **env: str) -> ServiceProcess:
    """A `beamstream ispyb-sink` process writing to ``engine``'s database."""
    url = engine.url.render_as_string(hide_password=False)
    return ServiceProcess(settings, log_dir, name, "--log-level", "warning", *args, command="ispyb-sink",
                          env={"BEAMSTREAM_ISPYB_URL": url, **env})


def in_list(dcids: list[int]) -> str:
    return ", ".join(str(d) for d in dcids)


def count_rows(engine: Engine, dcids: list[int]) -> int:
    return scalar(engine, f"SELECT count(*) FROM ImageQualityIndicators WHERE dataCollectionId IN ({in_list(dcids)})")


def tally(engine: Engine, dcids: list[int], images: int) -> tuple[int, int]:
    """(lost, duplicated): images without a row, and rows or processing runs beyond one each."""
    where = f"dataCollectionId IN ({in_list(dcids)})"
    rows = scalar(engine, f"SELECT count(*) FROM ImageQualityIndicators WHERE {where}")
    distinct = scalar(engine, f"SELECT count(DISTINCT dataCollectionId, imageNumber) FROM ImageQualityIndicators "
                              f"WHERE {where}")
    jobs = scalar(engine, f"SELECT count(*) FROM ProcessingJob WHERE {where}")
    return len(dcids) * images - distinct, rows - distinct + max(jobs - len(dcids), 0)


def assert_rows(engine: Engine, dcid: int, images: int) -> None:
    """One row per image with the figures its result carried, and one processing run."""
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT imageNumber, spotTotal, goodBraggCandidates FROM ImageQualityIndicators "
                                   "WHERE dataCollectionId = :d ORDER BY imageNumber"), {"d": dcid}).all()
    assert [r[0] for r in stored] == list(range(1, images + 1))
    assert all((spots, good) == (3 * n, 2 * n) for n, spots, good in stored)
    assert scalar(engine, "SELECT count(*) FROM ProcessingJob WHERE dataCollectionId = :d", d=dcid) == 1


def wait_caught_up(settings: Settings, group: str, topics: tuple[str, ...], timeout: float = 60) -> None:
    wait_until(lambda: all(committed_offsets(settings, group, t) == end_offsets(settings, t) for t in topics),
               timeout, what="the sink's offsets at the end of its topics")


def test_sink_killed_between_database_and_kafka_commit(kafka_settings, maria, tmp_path):
    """SIGKILL the sink process right after a batch's database commit (the fault-injection hook): its offsets
    are behind its rows; the restarted sink writes the batch again, which changes nothing."""
    settings, images = kafka_settings, 200
    dcid = create_collection(maria, file_template="/data/k/x_####.cbf", number_of_images=images,
                             experiment_type="grid", grid={"rows": 10, "columns": 20, "step_x_um": 20.0,
                                                           "step_y_um": 20.0, "snaked": True})
    publish(settings, "results", "ImageResult", (result(dcid, n) for n in range(1, images + 1)))
    publish(settings, "summaries", "CollectionSummary", [summary(dcid, images, images)])
    group = f"{settings.topic_prefix}ispyb-sink"

    doomed = sink_process(settings, tmp_path, maria, "doomed", "--batch-size", "50", **{FAULT_KILL_ENV: "2"})
    doomed.start()
    assert doomed.process.wait(60) == -signal.SIGKILL, doomed.log_text()[-2000:]
    written = count_rows(maria, [dcid])
    committed = messages_committed(committed_offsets(settings, group, "results"))
    assert written > committed, f"the kill came after the Kafka commit: {written} rows, {committed} offsets"

    again = sink_process(settings, tmp_path, maria, "again", "--batch-size", "50")
    restarted = time.monotonic()
    again.start()
    try:
        wait_until(lambda: count_rows(maria, [dcid]) > written, what="a row written after the restart")
        recovery_s = time.monotonic() - restarted
        wait_caught_up(settings, group, ("results", "summaries"))
        assert again.terminate() == 0
    finally:
        again.terminate()
    lost, duplicated = tally(maria, [dcid], images)
    record_fault("ispyb sink killed between its commits", images=images, lost=lost, duplicated=duplicated,
                 recovery_s=recovery_s, rows_at_kill=written, offsets_at_kill=committed)
    assert (lost, duplicated) == (0, 0)
    assert_rows(maria, dcid, images)
    assert scalar(maria, "SELECT count(*) FROM AutoProcProgram a JOIN ProcessingJob j USING (processingJobId) "
                  "WHERE j.dataCollectionId = :d AND a.processingStatus = 1", d=dcid) == 1


def insert_waiting_ms(conn) -> float:
    """How long another connection of this user has been running a statement on ImageQualityIndicators (ms)."""
    waiting = conn.execute(text("SELECT max(TIME_MS) FROM information_schema.PROCESSLIST WHERE COMMAND = 'Query' "
                                "AND ID != CONNECTION_ID() AND INFO LIKE '%ImageQualityIndicators%'")).scalar()
    return float(waiting or 0)


def kill_mariadb_mid_batch(mariadb, engine: Engine, dcid: int, image: int) -> float:
    """SIGKILL the server (no clean shutdown: InnoDB recovers on the next start) while the sink is inside a
    batch: hold a lock its write of ``image`` of ``dcid`` needs (the row's gap, by SELECT ... FOR UPDATE), wait
    until its INSERT has waited on it for a second (the process list), then kill. Returns how long it waited."""
    pid = int((mariadb.directory / "mariadb.pid").read_text().strip())
    blocker = engine.connect()
    blocker.begin()
    blocker.execute(text("SELECT * FROM ImageQualityIndicators WHERE dataCollectionId = :d AND imageNumber = :n "
                         "FOR UPDATE"), {"d": dcid, "n": image})
    try:
        with engine.connect() as watcher:
            wait_until(lambda: insert_waiting_ms(watcher) >= 1000, 30, what="the sink's batch to wait on the lock")
            blocked_ms = insert_waiting_ms(watcher)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "mysqld survived SIGKILL"
    finally:
        blocker.invalidate()  # its server is gone: nothing to roll back
    return round(blocked_ms / 1000, 2)


def test_mariadb_killed_mid_batch(kafka_settings, maria, mariadb, tmp_path):
    """SIGKILL MariaDB while the sink's batch is inside its database transaction (held there by a lock the
    test takes): the sink backs off until the restarted server answers, then every row is there once."""
    settings, images = kafka_settings, 300
    dcids = [create_collection(maria, file_template=f"/data/m{i}/x_####.cbf", number_of_images=images)
             for i in range(3)]
    values = [result(d, n) for n in range(1, images + 1) for d in dcids]
    streamer = threading.Thread(target=stream, args=(settings, values, 30, 0.3), daemon=True)
    sink = sink_process(settings, tmp_path, maria, "sink").start()
    try:
        streamer.start()
        wait_until(lambda: count_rows(maria, dcids) >= 150, what="the first rows")
        blocked_s = kill_mariadb_mid_batch(mariadb, maria, dcids[0], images)
        try:
            wait_until(lambda: "database unavailable" in sink.log_text(), 30, what="the sink to notice the outage")
        finally:
            mariadb.start()
        back = time.monotonic()
        at_restart = count_rows(maria, dcids)
        wait_until(lambda: count_rows(maria, dcids) > at_restart, 60, what="a row written after the restart")
        recovery_s = time.monotonic() - back
        streamer.join(60)
        wait_until(lambda: count_rows(maria, dcids) >= len(values), 60, what="every row")
        wait_caught_up(settings, f"{settings.topic_prefix}ispyb-sink", ("results",))
        assert sink.process.poll() is None, "the sink should ride out the outage"
    finally:
        sink.terminate()
    lost, duplicated = tally(maria, dcids, images)
    record_fault("mariadb killed mid-batch", images=len(values), lost=lost, duplicated=duplicated,
                 recovery_s=recovery_s, rows_at_restart=at_restart, batch_blocked_s=blocked_s)
    assert (lost, duplicated) == (0, 0)
    for dcid in dcids:
        assert_rows(maria, dcid, images)
