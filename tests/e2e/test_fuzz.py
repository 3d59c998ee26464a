"""Bad input at scale: each consumer, a real process on a real broker, takes thousands of random and mutated
messages (tests/helpers/fuzz.py) interleaved with valid ones. None may crash; each message a consumer cannot
use is in the dead-letter topic exactly once, with its reason and its source topic, partition and offset;
every valid one is answered (a result, a summary, a row, a manifest, a datagram, a collection on the page).

``BEAMSTREAM_FUZZ_MESSAGES`` sets the bad messages per consumer (CI: see ``CI_SIZE``), ``BEAMSTREAM_FUZZ_SEED``
the seed; ``scripts/soak-fuzz`` runs the long version.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from beamstream.connectors.ispyb_collections import create_collection
from beamstream.connectors.ispyb_mapping import RecordError, check_result, check_summary
from beamstream.platform.lag import GroupLag
from beamstream.platform.retained import Record, offset_bounds, open_reader, partitions_of, read_range
from beamstream.platform.settings import Settings, load_settings, path_within_roots
from beamstream.platform.topics import apply_topics, group_name, topic_name
from beamstream.schemas.examples import example_event
from beamstream.schemas.keys import dcid_key, image_key
from beamstream.schemas.serde import SerdeError, SingleObjectSerde
from beamstream.streams.collection_state import event_problem
from tests.helpers.fuzz import Fuzzer, FuzzMessage, fuzz_messages, fuzz_seed, interleave, produce_all
from tests.helpers.harness import ServiceProcess, free_port_pair
from tests.helpers.ispyb_helpers import fresh_database

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

#: Bad messages per consumer in CI (``BEAMSTREAM_FUZZ_MESSAGES`` overrides it).
CI_SIZE = 10_000
#: Valid messages sent with them: one for every four bad ones.
VALID_SHARE = 0.25
#: dcids of valid collections, and of the collections the bad messages were made from (never the same).
VALID_DCID, FUZZ_DCID = 7_000_001, 8_000_001
SERDE = SingleObjectSerde()

Where = tuple[str, int, int]  # (topic, partition, offset)


# -- shared -------------------------------------------------------------------------------
def _bad_count() -> int:
    return fuzz_messages(CI_SIZE)


def _patience() -> float:
    """Seconds a consumer may take for its messages (a soak run's hundreds of thousands take a while)."""
    return 600 + _bad_count() / 50


def _settings(kafka_settings: Settings, tmp_path: Path, **extra) -> Settings:
    settings = load_settings(environ={}, bootstrap_servers=kafka_settings.kafka_bootstrap, home=kafka_settings.home,
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4, **extra)
    apply_topics(settings)
    return settings


def _records(settings: Settings, logical: str, ends: dict[int, int] | None = None) -> Iterator[Record]:
    """The committed records of a topic (up to ``ends``, else its current end), as they are read."""
    topic = topic_name(settings, logical)
    reader = open_reader(settings)
    try:
        bounds = offset_bounds(reader, topic, partitions_of(reader, topic))
        if ends is not None:
            bounds = {p: (low, min(high, ends.get(p, high))) for p, (low, high) in bounds.items()}
        yield from read_range(reader, topic, bounds, stall_timeout=60)
    finally:
        reader.close()


def _read(settings: Settings, logical: str, ends: dict[int, int] | None = None) -> list[Record]:
    return list(_records(settings, logical, ends))


def _dead_letters(settings: Settings, service_prefix: str) -> dict[Where, list[dict]]:
    """The dead letters of services whose name starts with ``service_prefix``, by their source (without the
    messages they carry: a soak run's would not fit in memory)."""
    letters: dict[Where, list[dict]] = defaultdict(list)
    for record in _records(settings, "deadletter"):
        letter = SERDE.decode(record.value, "deadletter", "DeadLetter").value
        if letter["service"].startswith(service_prefix):
            letter["payload"], letter["headers"] = len(letter["payload"]), len(letter["headers"])
            letters[(letter["source_topic"], letter["source_partition"], letter["source_offset"])].append(letter)
    return letters


def _wait(condition: Callable[[], bool], timeout: float, what: str, services: list[ServiceProcess]) -> None:
    """Poll ``condition``; fail at once when a service has exited (with its log), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        for service in services:
            code = service.process.poll()
            assert code is None, f"{service.name} exited with {code} while waiting for {what}:\n" \
                                 f"{_log_tail(service)}"
        if condition():
            return
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.5)


def _log_tail(service: ServiceProcess, lines: int = 40) -> str:
    return "\n".join(line[:600] for line in service.log_text().splitlines()[-lines:])


def _caught_up(settings: Settings, group: str, logical_topics: list[str], marks: dict[str, dict[int, int]]) -> bool:
    """True once ``group`` has committed every record before ``marks`` on each topic."""
    lag = GroupLag(settings)
    try:
        for logical in logical_topics:
            topic = topic_name(settings, logical)
            committed = lag.committed_offsets(group, topic, timeout_s=15)
            if lag.events_between(topic, committed, marks[logical], timeout_s=15):
                return False
        return True
    except Exception:  # noqa: BLE001 - a coordinator still moving: asked again
        return False
    finally:
        lag.close()


def _ends(settings: Settings, logical_topics: list[str]) -> dict[str, dict[int, int]]:
    lag = GroupLag(settings)
    try:
        return {t: lag.end_offsets(topic_name(settings, t), timeout_s=15) for t in logical_topics}
    finally:
        lag.close()


def _check_dead_letters(expected: dict[Where, str], letters: dict[Where, list[dict]], what: str,
                        either: set[Where] = frozenset()) -> None:
    """Every expected source dead-lettered exactly once with a reason containing the expected words;
    nothing else dead-lettered but, at most once, the sources in ``either``."""
    twice = {w: len(v) for w, v in letters.items() if len(v) > 1}
    missing = sorted(set(expected) - set(letters))
    unexpected = sorted(set(letters) - set(expected) - set(either))
    wrong = [(w, expected[w], letters[w][0]["reason"][:300]) for w in sorted(set(expected) & set(letters))
             if _unplaced(expected[w]) not in _unplaced(letters[w][0]["reason"])]
    assert not twice, f"{what}: {len(twice)} messages dead-lettered more than once: {list(twice.items())[:5]}"
    assert not missing, f"{what}: {len(missing)} bad messages not dead-lettered: {missing[:5]}"
    assert not unexpected, (f"{what}: {len(unexpected)} messages dead-lettered that should not be: "
                            f"{[(w, letters[w][0]['reason'][:200]) for w in unexpected[:5]]}")
    assert not wrong, f"{what}: {len(wrong)} dead letters with the wrong reason: {wrong[:5]}"
    for where, (letter, *_) in letters.items():
        assert letter["reason"] and letter["error_type"], f"{what}: a dead letter without a reason at {where}"


def _unplaced(reason: str) -> str:
    """A reason without the memory addresses some of fastavro's errors name (``<_io.BytesIO object at 0x..>``)."""
    return re.sub(r" at 0x[0-9a-f]+", "", reason)


def _serde_reason(value: bytes | None, topic: str, expected) -> str | None:
    """The serde's words for a value that does not decode as ``expected`` (None when it does)."""
    try:
        SERDE.decode(value, topic, expected)
    except SerdeError as exc:
        return str(exc)
    return None


def _report(consumer: str, bad: list[FuzzMessage], started: float) -> None:
    kinds = Counter(m.kind for m in bad)
    print(f"fuzz {consumer}: {len(bad)} bad messages (seed {fuzz_seed()}) in {time.monotonic() - started:.1f} s; "
          f"kinds: {dict(sorted(kinds.items()))}")


# -- the worker: images -> analysis; results, collections, samples -> collect ----------------------------
def _worker_messages(fuzzer: Fuzzer, root: Path, n_bad: int) -> tuple[list[FuzzMessage], list[FuzzMessage], dict]:
    """(every message in the order sent, the bad ones, the valid collections {dcid: images})."""
    rng = fuzzer.rng
    n_valid = max(20, int(n_bad * VALID_SHARE))
    collections = {VALID_DCID + i: n_valid // 20 for i in range(20)}
    valid_images, valid_collections = [], []
    for dcid, images in collections.items():
        started = example_event("CollectionStarted")
        started.update(dcid=dcid, number_of_images=images, experiment_type="rotation", grid=None,
                       file_template=str(root / f"c{dcid}_#####.cbf"))
        valid_collections.append(fuzzer.valid("collections", "CollectionStarted", started, dcid_key(dcid)))
        for number in range(1, images + 1):
            image = example_event("ImageArrived")
            image.update(dcid=dcid, image_number=number, file_path=str(root / f"c{dcid}_{number:05d}.cbf"))
            valid_images.append(fuzzer.valid("images", "ImageArrived", image, image_key(dcid, number)))
    rng.shuffle(valid_images)
    for dcid, images in collections.items():
        ended = example_event("CollectionEnded")
        ended.update(dcid=dcid, images_collected=images)
        valid_collections.append(fuzzer.valid("collections", "CollectionEnded", ended, dcid_key(dcid)))

    bad_images, bad_collect = [], []
    for i in range(n_bad):
        dcid, number = FUZZ_DCID + i % 50, 1 + i % 400
        number = 1 + i // 50  # one event per image: a copy of an image may be skipped (answered once)
        image = example_event("ImageArrived")
        image.update(dcid=dcid, image_number=number, file_path=str(root / f"f{dcid}_{number:05d}.cbf"))
        bad_images.append(fuzzer.bad("images", "ImageArrived", image, image_key(dcid, number)))
    for i in range(n_bad):
        dcid = FUZZ_DCID + i % 50
        topic = rng.choice(["results", "results", "collections", "collections", "samples"])
        if topic == "results":
            record_type, key = "ImageResult", dcid_key(dcid)
        elif topic == "collections":
            record_type, key = rng.choice(["CollectionStarted", "CollectionEnded", "CollectionCheck"]), dcid_key(dcid)
        else:
            record_type, key = "CollectionSummary", str(77 + i % 5).encode()
        record = example_event(record_type)
        record["dcid"] = dcid
        if record_type == "ImageResult":
            record["image_number"] = 1 + i % 400
        if record_type == "CollectionSummary":
            record["sample_id"] = 77 + i % 5
            record["grid_plane"] = rng.choice(["xy", "xz"])
        others = ["ImageArrived", "ArchiveComplete", "DeadLetter", "ServiceHeartbeat"]
        bad_collect.append(fuzzer.bad(topic, record_type, record, key, others))
    messages = interleave(rng, valid_images, bad_images) + interleave(rng, valid_collections, bad_collect)
    return messages, bad_images + bad_collect, collections


def _analysis_verdict(value: bytes | None, topic: str, roots: tuple[str, ...]) -> str | None:
    """What the analysis stage must dead-letter an image event for (None: it must answer it)."""
    reason = _serde_reason(value, topic, "ImageArrived")
    if reason is not None:
        return reason
    image = SERDE.decode(value, topic, "ImageArrived").value
    if not path_within_roots(image["file_path"], roots):
        return "outside the configured data roots"
    return None


def _copies(images: list[FuzzMessage], topic: str) -> set[tuple[int, int]]:
    """Where the image events are that decode to the same image (collection, job, number) as another."""
    by_image = defaultdict(list)
    for message in images:
        if _serde_reason(message.value, topic, "ImageArrived") is None:
            image = SERDE.decode(message.value, topic).value
            by_image[(image["dcid"], image["processing_job_id"], image["image_number"])].append(message.where)
    return {where for wheres in by_image.values() if len(wheres) > 1 for where in wheres}


COLLECT_TYPES = ("ImageResult", "CollectionStarted", "CollectionEnded", "CollectionCheck")


def _collect_verdict(record: Record, logical: str) -> str | None:
    """What the collect stage must dead-letter a record of ``logical`` for (None: it must take it in)."""
    if logical == "samples":
        reason = _serde_reason(record.value, record.topic, "CollectionSummary")
        if reason is not None:
            return reason
        sample = SERDE.decode(record.value, record.topic).value["sample_id"]
        return None if sample is not None and record.key == str(sample).encode() else "is not keyed by its sample id"
    reason = _serde_reason(record.value, record.topic, None)
    if reason is not None:
        return reason
    decoded = SERDE.decode(record.value, record.topic)
    if decoded.name not in COLLECT_TYPES:
        return f"unexpected {decoded.name} on {record.topic}"
    return event_problem(decoded.name, decoded.value)


def test_worker_survives_fuzzed_images_results_and_collection_events(kafka_settings, tmp_path):
    started_at = time.monotonic()
    root = tmp_path / "data"
    root.mkdir()
    settings = _settings(kafka_settings, tmp_path, data_roots=(str(root),))
    fuzzer = Fuzzer(fuzz_seed())
    messages, bad, collections = _worker_messages(fuzzer, root, _bad_count())
    worker = ServiceProcess(settings, tmp_path, "worker", "--analysis", "noop", "--summary-timeout", "3",
                            "--threads", "2", "--log-level", "warning").start()
    try:
        produce_all(settings, messages)
        images = [m for m in messages if m.topic == "images"]
        images_topic = topic_name(settings, "images")
        verdicts = {m.where: _analysis_verdict(m.value, images_topic, settings.data_roots) for m in images}
        copies = _copies(images, images_topic)  # mutated into the same image: answered once, the rest skipped
        answered = sum(v is None for w, v in verdicts.items() if w not in copies)
        marks = _ends(settings, ["images"])
        _wait(lambda: _caught_up(settings, group_name(settings, "analysis"), ["images"], marks), _patience(),
              "the analysis of every image event", [worker])
        collect_topics = ["results", "collections", "samples"]
        marks = _ends(settings, collect_topics)
        _wait(lambda: _caught_up(settings, group_name(settings, "collect"), collect_topics, marks), _patience(),
              "the collect stage to take in every result and collection event", [worker])
    finally:
        code = worker.terminate()
    assert code == 0, f"the worker exited with {code}:\n{_log_tail(worker)}"

    letters = _dead_letters(settings, "worker/")
    analysis_letters = {w: v for w, v in letters.items() if w[0] == images_topic}
    _check_dead_letters({(images_topic, *w): r for w, r in verdicts.items() if r is not None and w not in copies},
                        analysis_letters, "analysis stage", {(images_topic, *w) for w in copies})
    sent = {m.where for m in messages if m.topic == "results"}
    results = [SERDE.decode(r.value, r.topic, "ImageResult").value
               for r in _records(settings, "results", marks["results"])
               if (r.partition, r.offset) not in sent]  # the analysis stage's own
    per_image = Counter((r["dcid"], r["image_number"]) for r in results if r["dcid"] in collections)
    assert sorted(per_image) == sorted((d, n) for d, count in collections.items() for n in range(1, count + 1))
    assert set(per_image.values()) == {1}, "a valid image was answered twice"
    assert answered <= len(results) <= answered + len(copies)

    collect_expected: dict[Where, str] = {}
    for logical in collect_topics:
        for record in _records(settings, logical, marks[logical]):
            reason = _collect_verdict(record, logical)
            if reason is not None:
                collect_expected[(record.topic, record.partition, record.offset)] = reason
    _check_dead_letters(collect_expected, {w: v for w, v in letters.items() if w[0] != images_topic},
                        "collect stage")
    by_dcid = defaultdict(list)
    for decoded in [SERDE.decode(r.value, r.topic) for r in _read(settings, "summaries")]:
        if decoded.name == "CollectionSummary":
            by_dcid[decoded.value["dcid"]].append(decoded.value)
    for dcid, count in collections.items():
        [summary] = by_dcid[dcid]
        assert summary["status"] == "complete" and summary["images_analysed"] == count, summary
    print(f"analysis: {answered} of {len(images)} image events answered, {len(results)} results in all")
    _report("worker", bad, started_at)



# -- the archiver: collections -> manifests and ArchiveComplete ---------------------------------------------
ARCHIVER_TYPES = ("CollectionStarted", "CollectionEnded", "CollectionCheck")


def test_archiver_survives_fuzzed_collection_events(kafka_settings, tmp_path):
    started_at = time.monotonic()
    archive_root = tmp_path / "archive"
    settings = _settings(kafka_settings, tmp_path, archive_root=str(archive_root))
    fuzzer = Fuzzer(fuzz_seed() + 1)
    rng, n_bad = fuzzer.rng, _bad_count()
    valid_starts, valid_ends, collections = [], [], {}
    for i in range(max(4, int(n_bad * VALID_SHARE) // 2)):
        dcid = VALID_DCID + i
        folder = tmp_path / "data" / str(dcid)
        folder.mkdir(parents=True)
        images = 1 + i % 3
        for number in range(1, images + 1):
            (folder / f"x_{number:04d}.cbf").write_bytes(rng.randbytes(64))
        collections[dcid] = images
        started = example_event("CollectionStarted")
        started.update(dcid=dcid, number_of_images=images, file_template=str(folder / "x_####.cbf"))
        valid_starts.append(fuzzer.valid("collections", "CollectionStarted", started, dcid_key(dcid)))
        ended = example_event("CollectionEnded")
        ended.update(dcid=dcid, images_collected=images)
        valid_ends.append(fuzzer.valid("collections", "CollectionEnded", ended, dcid_key(dcid)))
    bad = []
    for i in range(n_bad):
        dcid = FUZZ_DCID + i % 200
        record_type = rng.choice(ARCHIVER_TYPES)
        record = example_event(record_type)
        record["dcid"] = dcid
        if record_type == "CollectionStarted":
            record.update(file_template=str(tmp_path / "fuzz" / f"f{dcid}_####.cbf"), number_of_images=3)
        if record_type == "CollectionEnded":
            record["images_collected"] = 3
        bad.append(fuzzer.bad("collections", record_type, record, dcid_key(dcid),
                              ["ImageArrived", "ImageResult", "CollectionSummary", "DeadLetter"]))
    # Starts before ends, so every valid collection is archived whatever the partitions' order.
    messages = interleave(rng, valid_starts, bad[: n_bad // 2]) + interleave(rng, valid_ends, bad[n_bad // 2:])
    archiver = ServiceProcess(settings, tmp_path, "archiver", "--log-level", "warning", command="archiver",
                              env={"BEAMSTREAM_ARCHIVE_ROOT": str(archive_root)}).start()
    try:
        produce_all(settings, messages)
        marks = _ends(settings, ["collections"])
        _wait(lambda: _caught_up(settings, f"{settings.topic_prefix}archiver", ["collections"], marks), _patience(),
              "the archiver to take in every collection event", [archiver])
    finally:
        code = archiver.terminate()
    assert code == 0, f"the archiver exited with {code}:\n{_log_tail(archiver)}"

    topic = topic_name(settings, "collections")
    decoded = {m.where: SERDE.decode(m.value, topic) for m in messages
               if _serde_reason(m.value, topic, ARCHIVER_TYPES) is None}
    started_keys = {(d.value["dcid"], d.value["processing_job_id"]) for d in decoded.values()
                    if d.name == "CollectionStarted"}
    expected, either = {}, set()
    for message in bad:
        where = (topic, *message.where)
        reason = _serde_reason(message.value, topic, ARCHIVER_TYPES)
        if reason is not None:
            expected[where] = reason
        elif decoded[message.where].name == "CollectionEnded":
            value = decoded[message.where].value
            if (value["dcid"], value["processing_job_id"]) in started_keys:
                either.add(where)  # archived, or refused for what its start names; or skipped, archived already
            else:
                expected[where] = "no CollectionStarted"
    _check_dead_letters(expected, _dead_letters(settings, "archiver/"), "archiver", either)

    completes = Counter()
    for record in _read(settings, "archive"):
        value = SERDE.decode(record.value, record.topic, "ArchiveComplete").value
        completes[(value["dcid"], value["processing_job_id"])] += 1
    assert set(completes.values()) == {1}, "a collection was archived twice"
    for dcid, images in collections.items():
        assert completes[(dcid, None)] == 1, f"valid collection {dcid} not archived"
        manifest = json.loads((archive_root / str(dcid) / "x.manifest.json").read_text())
        assert manifest["complete"] and len(manifest["files"]) == images
    _report("archiver", bad, started_at)



# -- the ISPyB sink: results and summaries -> MariaDB -------------------------------------------------------
SUMMARY_TYPES = ("CollectionSummary", "SampleCentre")


def _sink_verdict(value: bytes | None, topic: str, logical: str, known_dcids: set[int]) -> tuple[str | None, bool]:
    """(the words the sink's dead letter must hold or None, whether the database may refuse it anyway)."""
    if logical == "results":
        reason = _serde_reason(value, topic, "ImageResult")
    else:
        reason = _serde_reason(value, topic, SUMMARY_TYPES)
    if reason is not None:
        return reason, False
    decoded = SERDE.decode(value, topic)
    if decoded.name == "SampleCentre":
        return None, False  # not ISPyB's business: skipped
    try:
        (check_result if logical == "results" else check_summary)(decoded.value)
    except RecordError as exc:
        return str(exc), False
    if decoded.value["dcid"] not in known_dcids or decoded.value["processing_job_id"] is not None:
        return "ISPyB refused", False  # no such DataCollection or ProcessingJob
    return None, True  # stored, or refused for a value no column holds


def test_ispyb_sink_survives_fuzzed_results_and_summaries(kafka_settings, mariadb_url, tmp_path):
    started_at = time.monotonic()
    settings = _settings(kafka_settings, tmp_path)
    engine = fresh_database(mariadb_url)
    fuzzer = Fuzzer(fuzz_seed() + 2)
    rng, n_bad = fuzzer.rng, _bad_count()
    known = {VALID_DCID + i for i in range(10)} | {FUZZ_DCID + i for i in range(50)}
    for dcid in sorted(known):
        create_collection(engine, file_template=f"/data/{dcid}/x_####.cbf", number_of_images=10, dcid=dcid)
    per_collection = max(1, int(n_bad * VALID_SHARE) // 10)
    valid = []
    for i in range(10):
        dcid = VALID_DCID + i
        for number in range(1, per_collection + 1):
            result = example_event("ImageResult")
            result.update(dcid=dcid, image_number=number, n_spots_total=number, n_spots_no_ice=number % 7)
            valid.append(fuzzer.valid("results", "ImageResult", result, dcid_key(dcid)))
        summary = example_event("CollectionSummary")
        summary.update(dcid=dcid, images_expected=per_collection, images_analysed=per_collection, best_image=None)
        valid.append(fuzzer.valid("summaries", "CollectionSummary", summary, dcid_key(dcid)))
    bad = []
    for i in range(n_bad):
        dcid = FUZZ_DCID + i % 50
        logical = "results" if rng.random() < 0.7 else "summaries"
        record_type = "ImageResult" if logical == "results" else "CollectionSummary"
        record = example_event(record_type)
        record.update(dcid=dcid, **({"image_number": 1 + i // 50} if logical == "results" else {}))
        bad.append(fuzzer.bad(logical, record_type, record, dcid_key(dcid),
                              ["ImageArrived", "CollectionStarted", "ArchiveComplete", "SampleCentre"]))
    messages = interleave(rng, valid, bad)
    sink = ServiceProcess(settings, tmp_path, "sink", "--batch-wait", "0.1", "--log-level", "warning",
                          command="ispyb-sink", env={"BEAMSTREAM_ISPYB_URL": engine.url.render_as_string(False)})
    sink.start()
    try:
        produce_all(settings, messages)
        marks = _ends(settings, ["results", "summaries"])
        _wait(lambda: _caught_up(settings, f"{settings.topic_prefix}ispyb-sink", ["results", "summaries"], marks),
              _patience(), "the sink to store or dead-letter every message", [sink])
    finally:
        code = sink.terminate()
    assert code == 0, f"the sink exited with {code}:\n{_log_tail(sink)}"

    expected, either = {}, set()
    for message in bad:
        topic = topic_name(settings, message.topic)
        reason, maybe = _sink_verdict(message.value, topic, message.topic, known)
        if reason is not None:
            expected[(topic, *message.where)] = reason
        elif maybe:
            either.add((topic, *message.where))
    _check_dead_letters(expected, _dead_letters(settings, "ispyb-sink"), "ISPyB sink", either)
    with engine.connect() as conn:
        rows = {(r.dataCollectionId, r.imageNumber): (r.spotTotal, r.goodBraggCandidates) for r in conn.execute(
            text("SELECT dataCollectionId, imageNumber, spotTotal, goodBraggCandidates FROM ImageQualityIndicators "
                 "WHERE dataCollectionId >= :low AND dataCollectionId < :high"),
            {"low": VALID_DCID, "high": VALID_DCID + 10})}
        closed = conn.execute(text(
            "SELECT count(*) FROM AutoProcProgram p JOIN ProcessingJob j USING (processingJobId) "
            "WHERE j.dataCollectionId >= :low AND j.dataCollectionId < :high AND p.processingStatus = 1"),
            {"low": VALID_DCID, "high": VALID_DCID + 10}).scalar()
    assert rows == {(VALID_DCID + i, n): (n, n % 7) for i in range(10) for n in range(1, per_collection + 1)}
    assert closed == 10, "a valid summary did not close its run"
    _report("ispyb-sink", bad, started_at)


# -- GDA feedback: results -> PIA datagrams ------------------------------------------------------------------
class _Gda:
    """A UDP listener keeping every datagram it receives (a reader thread and a large buffer: none dropped)."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.socket.getsockname()
        return f"{host}:{port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.received.append(self.socket.recv(65536))
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close()


def test_gda_feedback_survives_fuzzed_results(kafka_settings, tmp_path):
    from beamstream.connectors.gda_feedback import pia_datagram
    from tests.helpers.metrics_helpers import scrape, value

    started_at = time.monotonic()
    settings = _settings(kafka_settings, tmp_path)
    fuzzer = Fuzzer(fuzz_seed() + 3)
    rng, n_bad = fuzzer.rng, _bad_count()
    valid = []
    for i in range(max(1, int(n_bad * VALID_SHARE))):
        result = example_event("ImageResult")
        result.update(dcid=VALID_DCID + i % 10, image_number=1 + i // 10, n_spots_total=i)
        valid.append(fuzzer.valid("results", "ImageResult", result, dcid_key(result["dcid"])))
    bad = []
    for i in range(n_bad):
        result = example_event("ImageResult")
        result.update(dcid=FUZZ_DCID + i % 50, image_number=1 + i // 50)
        bad.append(fuzzer.bad("results", "ImageResult", result, dcid_key(result["dcid"]),
                              ["ImageArrived", "CollectionSummary", "CollectionStarted", "DeadLetter"]))
    messages = interleave(rng, valid, bad)
    topic = topic_name(settings, "results")
    expected = Counter()  # the datagram of every result that decodes, valid or not
    skipped = Counter()  # error type of every one that does not: skipped (the workers own the topic's contract)
    for message in messages:
        try:
            expected[pia_datagram(SERDE.decode(message.value, topic, "ImageResult").value)] += 1
        except SerdeError as exc:
            skipped[type(exc).__name__] += 1
    gda, port = _Gda(), free_port_pair()
    feedback = ServiceProcess(settings, tmp_path, "feedback", "--udp", gda.address, "--from-beginning",
                              "--metrics-port", str(port), "--log-level", "warning", command="feedback").start()
    try:
        produce_all(settings, messages)

        def consumed() -> float:
            try:
                return value(scrape(port), "beamstream_feedback_results_consumed_total") or 0
            except OSError:
                return 0
        _wait(lambda: consumed() == len(messages) and len(gda.received) >= sum(expected.values()), _patience(),
              "a datagram for every result that decodes", [feedback])
        samples = scrape(port)
    finally:
        code = feedback.terminate()
        gda.close()
    assert code == 0, f"feedback exited with {code}:\n{_log_tail(feedback)}"
    assert Counter(gda.received) == expected
    for m in valid:
        assert pia_datagram(m.record) in expected
    assert {k: value(samples, "beamstream_feedback_results_skipped_total", error_type=k) for k in skipped} == skipped
    assert not _dead_letters(settings, "gda"), "feedback dead-letters nothing: the workers own the results topic"
    _report("gda-feedback", bad, started_at)


# -- the dashboard's feed: every topic of the page -> the JSON API --------------------------------------------
#: The feed's topics and the record type each is fuzzed from (and the records of other topics sent there).
DASHBOARD_TOPICS = {"collections": "CollectionStarted", "results": "ImageResult", "announce": "CollectionProgress",
                    "summaries": "CollectionSummary", "heartbeats": "ServiceHeartbeat", "deadletter": "DeadLetter",
                    "deadletter-resolved": "DeadLetterResolved", "monitor": "MonitorEvent", "images": "ImageArrived"}


def _api(port: int, path: str) -> tuple[int, object]:
    """(status, body) of a GET on the dashboard's API; the body must be strict JSON (no NaN: browsers refuse it)."""
    def no_constants(name: str):
        raise ValueError(f"{path} answered {name}, which is not JSON")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, json.loads(response.read(), parse_constant=no_constants)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_dashboard_feed_survives_fuzzed_topics(kafka_settings, tmp_path):
    started_at = time.monotonic()
    settings = _settings(kafka_settings, tmp_path)
    fuzzer = Fuzzer(fuzz_seed() + 4)
    rng, n_bad = fuzzer.rng, _bad_count()
    valid, collections = [], {}
    for i in range(max(2, int(n_bad * VALID_SHARE) // 25)):
        dcid, images = VALID_DCID + i, 20
        collections[dcid] = images
        started = example_event("CollectionStarted")
        started.update(dcid=dcid, number_of_images=images)  # a 4 x 5 grid
        valid.append(fuzzer.valid("collections", "CollectionStarted", started, dcid_key(dcid)))
        for number in range(1, images + 1):
            result = example_event("ImageResult")
            result.update(dcid=dcid, image_number=number, n_spots_no_ice=number)
            valid.append(fuzzer.valid("results", "ImageResult", result, dcid_key(dcid)))
        summary = example_event("CollectionSummary")
        summary.update(dcid=dcid, images_analysed=images, best_image=images, best_image_spots=images)
        valid.append(fuzzer.valid("summaries", "CollectionSummary", summary, dcid_key(dcid)))
    bad = []
    for i in range(n_bad):
        logical = rng.choice(list(DASHBOARD_TOPICS))
        record_type = DASHBOARD_TOPICS[logical]
        record = example_event(record_type)
        if "dcid" in record:
            record["dcid"] = FUZZ_DCID + i % 50
        message = fuzzer.bad(logical, record_type, record, dcid_key(FUZZ_DCID + i % 50))
        if logical in ("heartbeats", "deadletter-resolved") and not message.key:
            message.key = b"fuzz"  # compacted: the broker itself refuses a record without a key
        bad.append(message)
    messages = interleave(rng, valid, bad)
    port = free_port_pair()
    dashboard = ServiceProcess(settings, tmp_path, "dashboard", "--port", str(port), command="dashboard").start()
    try:
        produce_all(settings, messages)
        applied = sum(1 for m in messages if m.topic != "images" and m.value is not None
                      and _serde_reason(m.value, "", None) is None)

        def records_read() -> int:
            try:
                return _api(port, "/api/health")[1]["records_read"]
            except OSError:
                return -1
        _wait(lambda: records_read() >= applied, _patience(), f"the feed to apply {applied} records", [dashboard])
        time.sleep(2)  # nothing more may come: every bad record is skipped, none applied twice
        assert records_read() == applied
        status, rows = _api(port, "/api/collections")
        assert status == 200
        by_id = {row["dcid"]: row for row in rows if row["processing_job_id"] is None}
        for dcid, images in collections.items():
            assert by_id[dcid]["state"] == "complete" and by_id[dcid]["images_analysed"] == images, by_id[dcid]
            status, detail = _api(port, f"/api/collections/{dcid}")
            assert status == 200 and detail["summary"]["images_analysed"] == images, detail
        failing = {}
        for row in rows:  # every collection the page lists, the fuzzed ones too, answers (a 400 names a bad id)
            job = "" if row["processing_job_id"] is None else f"?job={row['processing_job_id']}"
            status, body = _api(port, f"/api/collections/{row['dcid']}{job}")
            if status >= 500 or (status == 400 and row["dcid"] > 0 and (row["processing_job_id"] or 1) > 0):
                failing[row["id"]] = body
        assert not failing, f"{len(failing)} collection pages failed: {list(failing.items())[:3]}"
        for path in ("/api/services", "/api/deadletters", "/api/pipeline"):
            assert _api(port, path)[0] == 200, path
    finally:
        code = dashboard.terminate()
    assert code == 0, f"the dashboard exited with {code}:\n{_log_tail(dashboard)}"
    _report("dashboard feed", bad, started_at)
