"""The ISPyB sink: mapping and upserts on SQLite; end to end on a real broker and a real MariaDB."""

from __future__ import annotations

import math
import threading

import pytest
from sqlalchemy import text

from beamstream.connectors import ispyb_mapping as mapping
from beamstream.connectors.ispyb_collections import create_collection
from beamstream.connectors.ispyb_schema import create_schema, make_engine
from beamstream.connectors.ispyb_writer import DataRefused, IspybWriter
from beamstream.platform.topics import topic_name
from beamstream.schemas.examples import example_event
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import make_serde
from tests.helpers.ispyb_helpers import (
    SinkThread,
    committed_offsets,
    end_offsets,
    fresh_database,
    messages_committed,
    publish,
    publish_raw,
    read_all,
    result,
    scalar,
    stream,
    summary,
    wait_until,
)


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ispyb.sqlite'}")
    create_schema(engine)
    return engine


@pytest.fixture(scope="module")
def maria(mariadb_url):
    """A database of this module's own on the session's MariaDB, with the ISPyB schema."""
    engine = fresh_database(mariadb_url)
    yield engine
    engine.dispose()


def rows(engine, table="ImageQualityIndicators", where="1=1", **params):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(f"SELECT * FROM {table} WHERE {where} ORDER BY imageNumber"),
                                              params).mappings()]


# -- mapping (pure) -----------------------------------------------------------------
def test_result_maps_to_quality_indicators():
    value = example_event("ImageResult")
    row = mapping.quality_indicators(value)
    assert row == {
        "dataCollectionId": 1001, "imageNumber": 1, "spotTotal": 120, "goodBraggCandidates": 110,
        "inResTotal": 80, "method1Res": 2.1, "method2Res": 2.0, "totalIntegratedSignal": 123456.0,
        "recordTimeStamp": value["result_time"].replace(tzinfo=None),
    }


def test_undefined_figures_become_null():
    value = example_event("ImageResult")
    value.update(d_min_distl_method_1=-1.0, d_min_distl_method_2=math.nan, total_intensity=math.inf)
    row = mapping.quality_indicators(value)
    assert row["method1Res"] is None and row["method2Res"] is None and row["totalIntegratedSignal"] is None


@pytest.mark.parametrize("field, bad", [("image_number", 0), ("dcid", 0), ("processing_job_id", -3)])
def test_impossible_results_are_refused_before_the_database(field, bad):
    value = example_event("ImageResult")
    value[field] = bad
    with pytest.raises(mapping.RecordError, match=field.split("_")[0] if field != "image_number" else "start at 1"):
        mapping.quality_indicators(value)


def test_run_uuid_is_deterministic_and_distinct():
    assert mapping.run_uuid(5, None) == mapping.run_uuid(5, None)
    assert len({mapping.run_uuid(5, None), mapping.run_uuid(5, 1), mapping.run_uuid(6, None)}) == 3


def test_summary_message_names_missing_images():
    values = mapping.summary_values(summary(7, expected=30, analysed=5))
    assert values["processingStatus"] == mapping.STATUS_FAILED
    assert values["processingMessage"].startswith("incomplete: 5/30 images analysed; missing 25: 6, 7,")
    assert len(values["processingMessage"]) <= 255


# -- the writer on SQLite -----------------------------------------------------------
def test_schema_is_created_once(sqlite_engine):
    assert create_schema(sqlite_engine) == []
    assert scalar(sqlite_engine, "SELECT count(*) FROM ImageQualityIndicators") == 0


def test_null_never_overwrites_a_stored_value(sqlite_engine):
    writer = IspybWriter(sqlite_engine)
    writer.write([result(9, 1)])
    writer.write([result(9, 1, n_spots_total=77, d_min_distl_method_1=None, d_min_distl_method_2=-1.0)])
    [row] = rows(sqlite_engine)
    assert row["spotTotal"] == 77  # a new value replaces the old one
    assert row["method1Res"] == pytest.approx(1.01) and row["method2Res"] == pytest.approx(1.51)


def test_replaying_a_batch_changes_nothing(sqlite_engine):
    writer = IspybWriter(sqlite_engine)
    batch = [result(9, n) for n in range(1, 11)]
    writer.write(batch, [summary(9, 10, 10)])
    before = rows(sqlite_engine)
    IspybWriter(sqlite_engine).write(batch, [summary(9, 10, 10)])  # a restarted sink: no cache
    assert rows(sqlite_engine) == before
    assert scalar(sqlite_engine, "SELECT count(*) FROM AutoProcProgram") == 1
    assert scalar(sqlite_engine, "SELECT count(*) FROM ProcessingJob") == 1


def test_reprocessing_leaves_live_results_alone(sqlite_engine):
    writer = IspybWriter(sqlite_engine)
    writer.write([result(9, n) for n in (1, 2)])
    live = rows(sqlite_engine)
    writer.write([result(9, n, processing_job_id=4, n_spots_total=999) for n in (1, 2)], [summary(9, 2, 2, 4)])
    assert rows(sqlite_engine) == live
    reprocessed = rows(sqlite_engine, "ReprocessedImageQualityIndicators")
    assert [r["spotTotal"] for r in reprocessed] == [999, 999]
    with sqlite_engine.connect() as conn:
        programs = {r.processingJobId: r for r in conn.execute(text(
            "SELECT autoProcProgramId, processingJobId, processingStatus, processingPrograms FROM AutoProcProgram"))}
    assert set(programs) == {1, 4}  # the live run's own job (id 1) and the reprocessing job 4
    assert programs[4].processingStatus == 1 and programs[1].processingStatus is None
    assert {r["autoProcProgramId"] for r in reprocessed} == {programs[4].autoProcProgramId}
    assert {r["autoProcProgramId"] for r in live} == {programs[1].autoProcProgramId}


def test_summary_closes_the_run(sqlite_engine):
    writer = IspybWriter(sqlite_engine)
    first = result(9, 1)
    writer.write([first])
    writer.write([], [summary(9, 1, 1)])
    with sqlite_engine.connect() as conn:
        program = conn.execute(text("SELECT * FROM AutoProcProgram")).mappings().one()
    assert program["processingPrograms"] == "beamstream-per-image-analysis"
    assert program["processingStatus"] == 1
    assert program["processingMessage"].startswith("complete: 1/1 images analysed")
    assert program["processingStartTime"] is not None and program["processingEndTime"] is not None


# -- end to end: Kafka + MariaDB --------------------------------------------------------
GRID = {"rows": 10, "columns": 10, "step_x_um": 20.0, "step_y_um": 20.0, "snaked": True}


@pytest.mark.kafka
def test_grid_scan_end_to_end(kafka_settings, maria):
    dcid = create_collection(maria, file_template="/data/grid/x_####.cbf", number_of_images=100,
                             experiment_type="grid", grid=GRID)
    publish(kafka_settings, "results", "ImageResult", (result(dcid, n) for n in range(1, 101)))
    publish(kafka_settings, "summaries", "CollectionSummary", [summary(dcid, 100, 100)])

    with SinkThread(kafka_settings, maria) as sink:
        wait_until(lambda: scalar(maria, "SELECT count(*) FROM AutoProcProgram a JOIN ProcessingJob j "
                                  "USING (processingJobId) WHERE j.dataCollectionId = :d AND a.processingStatus = 1",
                                  d=dcid) == 1 and len(rows(maria, where="dataCollectionId = :d", d=dcid)) == 100,
                   what="100 rows and a closed program", sink=sink)
        # A replay of image 7 without resolutions: stored values stay.
        publish(kafka_settings, "results", "ImageResult",
                [result(dcid, 7, d_min_distl_method_1=None, d_min_distl_method_2=None, n_spots_total=5)])
        wait_until(lambda: rows(maria, where="dataCollectionId = :d AND imageNumber = 7", d=dcid)[0]["spotTotal"]
                   == 5, what="image 7 updated", sink=sink)
        stats = sink.stop()

    stored = rows(maria, where="dataCollectionId = :d", d=dcid)
    assert [r["imageNumber"] for r in stored] == list(range(1, 101))
    program_id = stored[0]["autoProcProgramId"]
    for row in stored:
        n = row["imageNumber"]
        assert row["autoProcProgramId"] == program_id
        assert (row["spotTotal"], row["goodBraggCandidates"], row["inResTotal"]) == (5 if n == 7 else 3 * n, 2 * n, n)
        assert row["totalIntegratedSignal"] == pytest.approx(100.0 * n)
        assert row["method1Res"] == pytest.approx(1.0 + n / 100, rel=1e-6)
        assert row["method2Res"] == pytest.approx(1.5 + n / 100, rel=1e-6)
        assert row["iceRings"] is None and row["dozor_score"] is None
    with maria.connect() as conn:
        program = conn.execute(text("SELECT * FROM AutoProcProgram WHERE autoProcProgramId = :p"),
                               {"p": program_id}).mappings().one()
        job = conn.execute(text("SELECT * FROM ProcessingJob WHERE processingJobId = :j"),
                           {"j": program["processingJobId"]}).mappings().one()
    assert program["processingMessage"].startswith("complete: 100/100")
    assert job["dataCollectionId"] == dcid and job["automatic"] == 1
    assert stats.results == 101 and stats.summaries == 1 and stats.dead_lettered == 0
    group = sink.sink.group_id
    assert committed_offsets(kafka_settings, group, "results") == end_offsets(kafka_settings, "results")
    assert committed_offsets(kafka_settings, group, "summaries") == end_offsets(kafka_settings, "summaries")


@pytest.mark.kafka
def test_database_outage_pauses_and_resumes_without_loss(kafka_settings, maria, mariadb):
    dcids = [create_collection(maria, file_template=f"/data/o{i}/x_####.cbf", number_of_images=1000)
             for i in range(3)]
    count = lambda: scalar(maria, "SELECT count(*) FROM ImageQualityIndicators WHERE dataCollectionId IN "  # noqa: E731
                           f"({', '.join(map(str, dcids))})")
    first = [result(d, n) for n in range(1, 301) for d in dcids]  # 900 results, streamed while the sink runs
    streamer = threading.Thread(target=stream, args=(kafka_settings, first, 30, 0.03), daemon=True)
    with SinkThread(kafka_settings, maria) as sink:
        streamer.start()
        wait_until(lambda: count() >= 100, what="the first rows", sink=sink)
        mariadb.stop()  # mid-stream
        try:
            # While the database is down nothing more is committed: the offsets freeze.
            frozen = messages_committed(committed_offsets(kafka_settings, sink.sink.group_id, "results"))
            wait_until(lambda: sink.sink.stats.outages >= 2, timeout=30, what="the sink to notice the outage")
            streamer.join(30)
            assert messages_committed(committed_offsets(kafka_settings, sink.sink.group_id, "results")) == frozen
            assert frozen < 900  # the outage really came mid-stream
        finally:
            mariadb.start()
        # It resumes on its own.
        wait_until(lambda: count() == 900, timeout=60, what="all 900 rows after the restart", sink=sink)
        wait_until(lambda: committed_offsets(kafka_settings, sink.sink.group_id, "results")
                   == end_offsets(kafka_settings, "results"), what="offsets caught up", sink=sink)

        # Down again, with new messages, and the sink stopped while it waits: none of them may be committed.
        second = [result(d, n) for n in range(301, 401) for d in dcids]
        outages = sink.sink.stats.outages
        mariadb.stop()
        try:
            publish(kafka_settings, "results", "ImageResult", second)
            wait_until(lambda: sink.sink.stats.outages >= outages + 2, timeout=30, what="the second outage")
            sink.stop()
        finally:
            mariadb.start()
    committed = messages_committed(committed_offsets(kafka_settings, sink.sink.group_id, "results"))
    assert committed <= count() == 900  # no offset ahead of the database
    with SinkThread(kafka_settings, maria) as again:  # a restarted sink finishes the job
        wait_until(lambda: count() == 1200, what="all 1200 rows", sink=again)
        wait_until(lambda: committed_offsets(kafka_settings, again.sink.group_id, "results")
                   == end_offsets(kafka_settings, "results"), what="offsets caught up", sink=again)
        again.stop()
    assert scalar(maria, "SELECT count(DISTINCT dataCollectionId, imageNumber) FROM ImageQualityIndicators "
                  f"WHERE dataCollectionId IN ({', '.join(map(str, dcids))})") == 1200
    assert scalar(maria, "SELECT count(*) FROM ProcessingJob WHERE dataCollectionId IN "
                  f"({', '.join(map(str, dcids))})") == 3  # one live run each, despite the replays


@pytest.mark.kafka
def test_poison_messages_go_to_the_dead_letter_topic(kafka_settings, maria):
    dcid = create_collection(maria, file_template="/data/p/x_####.cbf", number_of_images=10)
    good = [result(dcid, n) for n in range(1, 6)]
    publish(kafka_settings, "results", "ImageResult", good[:2])
    serde = make_serde()
    encode = lambda value: serde.encode("ImageResult", value, "results")  # noqa: E731
    # All on the collection's partition (the sink does not look at keys), at offsets 2 to 5.
    publish_raw(kafka_settings, "results", [(dcid_key(dcid), value) for value in (
        b"not avro at all",
        encode(result(987654321, 1)),  # no such collection: the database refuses the run's ProcessingJob
        encode(result(dcid, 9_000_000)),  # beyond ImageQualityIndicators.imageNumber (MEDIUMINT): known beforehand
        encode(result(dcid, 0)),  # an impossible image number
    )])
    publish(kafka_settings, "results", "ImageResult", good[2:])

    with SinkThread(kafka_settings, maria) as sink:
        wait_until(lambda: sink.sink.stats.dead_lettered == 4 and sink.sink.stats.results >= 5,
                   what="4 dead letters and 5 results", sink=sink)
        stats = sink.stop()
    assert stats.dead_lettered == 4
    assert [r["imageNumber"] for r in rows(maria, where="dataCollectionId = :d", d=dcid)] == [1, 2, 3, 4, 5]
    letters = sorted((d.value for d in read_all(kafka_settings, "deadletter", "DeadLetter", count=4)),
                     key=lambda v: v["source_offset"])
    assert [v["error_type"] for v in letters] == ["CorruptMessageError", "DataRefused", "RecordError", "RecordError"]
    assert [v["source_offset"] for v in letters] == [2, 3, 4, 5]
    assert all(v["service"] == "ispyb-sink" and v["source_topic"].endswith(".results") for v in letters)
    assert letters[0]["payload"] == b"not avro at all"
    assert "foreign key" in letters[1]["reason"].lower() and letters[1]["dcid"] == 987654321
    assert letters[1]["attempts"] == 3
    assert "end at 8388607" in letters[2]["reason"] and letters[2]["image_number"] == 9_000_000
    assert "start at 1" in letters[3]["reason"]
    assert committed_offsets(kafka_settings, sink.sink.group_id, "results") == end_offsets(kafka_settings, "results")


def test_refused_rows_raise_data_refused_on_mariadb(maria):
    with pytest.raises(DataRefused, match="foreign key"):
        IspybWriter(maria).write([result(55555555, 1)])


class Crash(Exception):
    """Stands for the sink process dying."""


@pytest.mark.kafka
def test_crash_between_database_and_offset_commit_replays_without_duplicates(kafka_settings, maria):
    dcid = create_collection(maria, file_template="/data/c/x_####.cbf", number_of_images=50)
    publish(kafka_settings, "results", "ImageResult", [result(dcid, n) for n in range(1, 51)])
    publish(kafka_settings, "summaries", "CollectionSummary", [summary(dcid, 50, 50)])

    results_topic = topic_name(kafka_settings, "results")

    def crash(messages):
        # The first batch with results (a batch of the summary alone can come first: the stage takes
        # what is fetched, and the two topics arrive in either order).
        if any(message.topic() == results_topic for message in messages):
            raise Crash("killed after the database commit, before the offsets")

    with SinkThread(kafka_settings, maria) as sink:
        sink.sink.after_database_commit = crash
        wait_until(lambda: sink.error is not None, what="the crash")
    assert isinstance(sink.error, Crash)
    written = len(rows(maria, where="dataCollectionId = :d", d=dcid))
    assert written > 0
    assert messages_committed(committed_offsets(kafka_settings, sink.sink.group_id, "results")) == 0

    with SinkThread(kafka_settings, maria) as again:  # the restarted sink reads the batch again
        wait_until(lambda: committed_offsets(kafka_settings, again.sink.group_id, "results")
                   == end_offsets(kafka_settings, "results"), what="offsets caught up", sink=again)
        again.stop()
    assert [r["imageNumber"] for r in rows(maria, where="dataCollectionId = :d", d=dcid)] == list(range(1, 51))
    assert scalar(maria, "SELECT count(*) FROM ProcessingJob WHERE dataCollectionId = :d", d=dcid) == 1
    assert scalar(maria, "SELECT count(*) FROM AutoProcProgram a JOIN ProcessingJob j USING (processingJobId) "
                  "WHERE j.dataCollectionId = :d AND a.processingStatus = 1", d=dcid) == 1


# -- the command line --------------------------------------------------------------------
@pytest.mark.kafka
def test_cli_creates_the_schema_and_the_sink_stops_cleanly_on_sigterm(kafka_settings, tmp_path):
    import json
    import signal
    import subprocess
    import sys

    from tests.helpers.harness import service_env

    database = tmp_path / "ispyb.sqlite"
    env = service_env(kafka_settings, BEAMSTREAM_ISPYB_URL=f"sqlite:///{database}")
    cli = [sys.executable, "-m", "beamstream"]

    missing = subprocess.run([*cli, "ispyb-sink"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "ispyb-schema create" in missing.stderr
    assert missing.stderr.count("\n") == 1

    created = subprocess.run([*cli, "ispyb-schema", "create"], env=env, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0 and "created 206 tables" in created.stdout
    again = subprocess.run([*cli, "ispyb-schema", "create"], env=env, capture_output=True, text=True, timeout=60)
    assert "already complete" in again.stdout

    publish(kafka_settings, "results", "ImageResult", [result(42, n) for n in range(1, 11)])
    engine = make_engine(f"sqlite:///{database}")
    sink = subprocess.Popen([*cli, "ispyb-sink"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM ImageQualityIndicators") == 10, what="10 rows")
        sink.send_signal(signal.SIGTERM)
        out, err = sink.communicate(timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
    assert sink.returncode == 0, err
    assert "stored 10 results" in out
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert logs and all(entry["service"] == "ispyb-sink" for entry in logs)
    assert any(entry["message"] == "ispyb sink started" for entry in logs)
