"""Dead-letter tools end to end: poison messages of every kind a real worker dead-letters, then
`beamstream dlq list/show/reinject/purge` as an operator uses them (a real broker, real CBF files)."""

from __future__ import annotations

import bz2
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from beamstream.engine.dead_letter_store import DeadLetterEntry, DeadLetterError, _Resolutions, normal_id
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.retained import Record, offset_bounds, open_reader, partitions_of, read_topic
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.schemas.keys import dcid_key, image_key
from tests.helpers.cli_run import one_line_error, run_cli
from tests.helpers.harness import ServiceProcess, TopicReader

DCID = 820001
GRID = {"rows": 1, "columns": 3, "step_x_um": 20.0, "step_y_um": 20.0}


def test_dead_letter_ids_are_named_in_errors():
    assert normal_id(" 2:017 ") == "2:17"
    for bad in ("2", "a:1", "1:-3", ""):
        with pytest.raises(DeadLetterError, match="expected PARTITION:OFFSET"):
            normal_id(bad)


def test_a_reinjected_message_resolves_its_other_dead_letters_that_failed_before():
    t0 = datetime(2026, 12, 1, tzinfo=UTC)

    def entry(offset: int, service: str, failed_at: datetime, source_offset: int = 5) -> DeadLetterEntry:
        value = {"service": service, "source_topic": "collections", "source_partition": 0,
                 "source_offset": source_offset, "failed_at": failed_at}
        return DeadLetterEntry(Record("deadletter", 0, offset, 0, None, b""), value)

    worker, archiver = entry(1, "worker", t0), entry(2, "archiver", t0 + timedelta(seconds=1))
    replayed = entry(3, "worker", t0 + timedelta(hours=1))  # the same message failing again, on a replay
    other = entry(4, "worker", t0, source_offset=6)
    marker = {**worker.value, "resolved_at": t0 + timedelta(minutes=1), "target_offset": 9}
    resolutions = _Resolutions({"0:1": marker})
    assert resolutions.of(worker) is marker and resolutions.of(archiver) is marker
    assert resolutions.of(replayed) is None and resolutions.of(other) is None
    # A marker left by a recreated dead-letter topic (same id, another message) resolves nothing.
    assert _Resolutions({"0:4": marker}).of(other) is None


def _ends(settings, logical: str) -> dict[int, int]:
    consumer = open_reader(settings)
    try:
        topic = topic_name(settings, logical)
        return {p: end for p, (_, end) in offset_bounds(consumer, topic, partitions_of(consumer, topic)).items()}
    finally:
        consumer.close()


def _starts(settings, logical: str) -> dict[int, int]:
    consumer = open_reader(settings)
    try:
        topic = topic_name(settings, logical)
        return {p: low for p, (low, _) in offset_bounds(consumer, topic, partitions_of(consumer, topic)).items()}
    finally:
        consumer.close()


def _json(result) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _thaumatin(data_dir: Path, number: int, target: Path) -> Path:
    target.write_bytes(bz2.decompress((data_dir / "thaumatin_grid" / f"thau_3_2_{number:04d}.cbf.bz2").read_bytes()))
    return target


@pytest.mark.kafka
@pytest.mark.slow
def test_poison_messages_are_dead_lettered_then_reinjected_and_purged(kafka_settings, data_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    settings = load_settings(bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4, data_roots=(str(root),))
    frames = [root / f"thau_{n:04d}.cbf" for n in (1, 2, 3)]
    _thaumatin(data_dir, 1, frames[0])
    _thaumatin(data_dir, 2, frames[1])  # frame 3 is "not written yet"
    images, collections = topic_name(settings, "images"), topic_name(settings, "collections")

    reader = TopicReader(settings, ["results", "summaries", "deadletter"])
    worker = ServiceProcess(settings, tmp_path, "worker", "--analysis", "real", "--retries", "2",
                           "--retry-backoff", "0.1", "--summary-timeout", "5", "--log-level", "warning").start()
    try:
        with EventPublisher(settings) as publisher:
            publisher.publish([collection_started(DCID, file_template=str(root / "thau_####.cbf"), number_of_images=3,
                                                  experiment_type="grid", grid=GRID)])
            publisher.publish([image_arrived(DCID, n, str(path)) for n, path in enumerate(frames, start=1)])
            publisher.publish([image_arrived(DCID + 1, 1, str(tmp_path / "elsewhere.cbf"))])  # outside the roots
        producer = make_producer(settings)
        producer.produce(images, b"\xc3\x01" + bytes(8) + b"unknown writer", dcid_key(DCID))  # unknown schema
        producer.produce(collections, b"not avro at all", dcid_key(DCID))  # the collection agent's poison
        producer.flush(10)

        reader.wait_for(lambda: len(reader.values("deadletter")) >= 4, 120, "four dead letters")
        reader.wait_for(lambda: len(reader.values("results", "ImageResult", DCID)) >= 2, 60, "two results")

        # -- list and show ------------------------------------------------------------
        rows = _json(run_cli(settings, "dlq", "list", "--json"))
        by_type = {r["error_type"]: r for r in rows}
        assert sorted(by_type) == ["CorruptMessageError", "ImageReadError", "OutsideDataRoots", "UnknownSchemaError"]
        missing = by_type["ImageReadError"]
        assert (missing["dcid"], missing["image_number"], missing["attempts"]) == (DCID, 3, 2)
        assert missing["service"] == f"worker/{images}" and missing["source_topic"] == images
        assert by_type["CorruptMessageError"]["service"] == f"worker/{collections}"
        assert all(r["resolution"] is None and r["reinjected_count"] == 0 for r in rows)
        assert [r["id"] for r in _json(run_cli(settings, "dlq", "list", "--json", "--service", f"worker/{collections}"))
                ] == [by_type["CorruptMessageError"]["id"]]
        assert _json(run_cli(settings, "dlq", "list", "--json", "--since", "2099-01-01T00:00Z")) == []
        table = run_cli(settings, "dlq", "list")
        assert missing["id"] in table.stdout and "OutsideDataRoots" not in table.stdout  # reasons, not types

        shown = _json(run_cli(settings, "dlq", "show", missing["id"], "--json"))
        assert shown["payload_decoded"]["record_type"] == "ImageArrived"
        assert shown["payload_decoded"]["value"]["file_path"] == str(frames[2])
        assert shown["key"]["text"] == f"{DCID}:3" and "thau_0003.cbf" in shown["reason"]
        poison = _json(run_cli(settings, "dlq", "show", by_type["UnknownSchemaError"]["id"], "--json"))
        assert "unknown schema fingerprint" in poison["payload_decoded"]["error"]
        assert poison["payload"]["hex_preview"].startswith("c3 01 00")
        assert "no dead letter 2:999" in one_line_error(run_cli(settings, "dlq", "show", "2:999"))

        # -- the cause is fixed, the image reinjected ------------------------------------
        _thaumatin(data_dir, 3, frames[2])
        images_before = _ends(settings, "images")
        refused = one_line_error(run_cli(settings, "dlq", "reinject", missing["id"]))
        assert "stdin is not a terminal (pass --yes)" in refused
        assert _ends(settings, "images") == images_before, "a refused reinjection wrote something"

        started = time.monotonic()
        done = run_cli(settings, "dlq", "reinject", missing["id"], "--yes")
        assert done.returncode == 0, done.stderr
        assert f"reinjected {missing['id']} -> {images}[" in done.stdout
        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", DCID), 60, "the summary")
        print(f"reinjection to summary: {time.monotonic() - started:.1f} s")
        with EventPublisher(settings) as publisher:
            publisher.publish([collection_ended(DCID, 3)])
        time.sleep(3)  # a duplicate result or summary would be committed by now

        counts = Counter(r["image_number"] for r in reader.values("results", "ImageResult", DCID))
        assert counts == {1: 1, 2: 1, 3: 1}
        [summary] = reader.values("summaries", "CollectionSummary", DCID)
        assert summary["status"] == "complete" and summary["images_analysed"] == 3
        assert summary["missing_images"] == []
        again = [r for r in reader.values("deadletter") if r["image_number"] == 3]
        assert len(again) == 1, "the reinjected image failed again"
        copies = [r for r in read_topic(settings, images) if r.key == image_key(DCID, 3)
                  and dict(r.headers).get("beamstream-reinjected") == b"1"]
        assert len(copies) == 1
        assert dict(copies[0].headers)["beamstream-reinjected-from"] == f"{topic_name(settings, 'deadletter')}:" \
            f"{missing['id']}".encode()

        # -- a second reinjection of the same dead letter is refused ------------------------
        images_before = _ends(settings, "images")
        assert "already reinjected" in one_line_error(run_cli(settings, "dlq", "reinject", missing["id"], "--yes"))
        assert _ends(settings, "images") == images_before
        rows = {r["id"]: r for r in _json(run_cli(settings, "dlq", "list", "--json"))}
        assert rows[missing["id"]]["resolution"]["target"].startswith(f"{images}[")
        dry = run_cli(settings, "dlq", "reinject", "--all", "--service", "worker", "--dry-run")
        assert dry.returncode == 0 and "3 dead letter(s) would be reinjected" in dry.stdout
        assert missing["id"] not in dry.stdout.split("dry run")[0]
        assert _ends(settings, "images") == images_before

        # -- purge keeps a JSON copy and moves the topic's start ----------------------------
        assert "pass --yes" in one_line_error(run_cli(settings, "dlq", "purge"))
        ends = _ends(settings, "deadletter")
        purged = run_cli(settings, "dlq", "purge", "--yes")
        assert purged.returncode == 0, purged.stderr
        copy = Path(purged.stdout.split("copy: ")[1].strip())
        assert copy.parent == settings.home / "dlq-purged"
        saved = json.loads(copy.read_text())
        assert sorted(d["id"] for d in saved["dead_letters"]) == sorted(rows)
        kept = next(d for d in saved["dead_letters"] if d["id"] == missing["id"])
        assert kept["payload_decoded"]["value"]["image_number"] == 3 and kept["resolution"]["action"] == "reinjected"
        assert _starts(settings, "deadletter") == ends
        assert _json(run_cli(settings, "dlq", "list", "--json")) == []
        assert run_cli(settings, "dlq", "purge", "--yes").stdout.strip() == "nothing to purge"
    finally:
        assert worker.terminate() == 0
        reader.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_a_message_every_consumer_gave_up_on_goes_back_once(kafka_settings, tmp_path):
    """The workers and the archiver both dead-letter a poison event on `collections`: reinjecting
    either puts one copy back (which reaches both again) and resolves both dead letters."""
    settings = kafka_settings
    collections = topic_name(settings, "collections")
    reader = TopicReader(settings, ["deadletter"])
    services = [ServiceProcess(settings, tmp_path, "worker", "--analysis", "noop", "--log-level", "warning"),
                ServiceProcess(settings, tmp_path, "archiver", command="archiver")]
    for service in services:
        service.start()
    try:
        producer = make_producer(settings)
        producer.produce(collections, b"not avro at all", dcid_key(DCID))
        producer.flush(10)
        reader.wait_for(lambda: len(reader.values("deadletter")) >= 2, 120, "a dead letter from each service")
        rows = _json(run_cli(settings, "dlq", "list", "--json"))
        assert sorted(r["service"] for r in rows) == [f"archiver/{collections}", f"worker/{collections}"]
        assert len({(r["source_topic"], r["source_partition"], r["source_offset"]) for r in rows}) == 1
        first, second = sorted(rows, key=lambda r: r["service"])

        dry = run_cli(settings, "dlq", "reinject", first["id"], "--dry-run")
        assert dry.returncode == 0 and "2 dead letter(s) would be reinjected" in dry.stdout
        done = run_cli(settings, "dlq", "reinject", first["id"], "--yes")
        assert done.returncode == 0, done.stderr
        copies = [r for r in read_topic(settings, collections) if dict(r.headers).get("beamstream-reinjected")]
        assert len(copies) == 1 and copies[0].value == b"not avro at all"
        # Both are resolved by that copy; the other cannot put a second one back.
        rows = {r["id"]: r for r in _json(run_cli(settings, "dlq", "list", "--json"))}
        targets = {rows[i]["resolution"]["target"] for i in (first["id"], second["id"])}
        assert len(targets) == 1 and targets.pop().startswith(f"{collections}[")
        assert "already reinjected" in one_line_error(run_cli(settings, "dlq", "reinject", second["id"], "--yes"))
        # The copy is still poison: each service gives up on it once more, counting the reinjection.
        reader.wait_for(lambda: len(reader.values("deadletter")) >= 4, 120, "the copy's dead letters")
        again = [r for r in reader.values("deadletter") if r["reinjected_count"] == 1]
        assert sorted(r["service"] for r in again) == [f"archiver/{collections}", f"worker/{collections}"]
        # Only the copy's two dead letters are left to reinject.
        assert "2 dead letter(s) would be reinjected" in run_cli(settings, "dlq", "reinject", "--all",
                                                                  "--dry-run").stdout
    finally:
        for service in services:
            assert service.terminate() == 0, service.log_text()[-2000:]
        reader.close()
    assert [r.value for r in read_topic(settings, collections)] == [b"not avro at all"] * 2  # original, one copy
