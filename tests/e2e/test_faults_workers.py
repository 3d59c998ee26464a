"""Worker faults on real processes: a zombie worker, a stage stuck in a commit, a fenced producer, and a
worker killed while its table restores.

Each test runs `beamstream worker` processes on a grid scan, injects its fault, and then checks with
read_committed readers that every image has exactly one result, that exactly one complete summary was
published, and that the collection table's last committed state equals a fresh fold of the results.
Each records what it counted with :func:`tests.helpers.faults.record_fault`.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaException, TopicPartition

from beamstream.engine.stage import STALLED_EXIT_CODE
from beamstream.operations.cluster import LocalCluster
from beamstream.platform.kafka_clients import make_admin, make_consumer, make_producer
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import apply_topics, group_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.streams import collection_state as cs
from tests.conftest import OWNER_FILE
from tests.helpers.faults import fault_random, record_fault
from tests.helpers.harness import ServiceProcess, Supervisor, TopicReader, free_port_pair

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.fault]

#: Workers that always have a backlog (50 ms an image, sleeping): a fault finds a batch in hand.
BUSY_WORKER = ("--analysis", "noop", "--simulated-analysis-time", "0.05", "--summary-timeout", "45")
#: How librdkafka reports the broker refusing a zombie's transactional offset commit (KIP-447: a member
#: expelled from its group, or of an older generation).
REFUSALS = ("Broker: Unknown member", "Broker: Specified group generation id is not valid")


@dataclass(frozen=True)
class Scan:
    """A grid scan of ``rows`` x ``columns`` images."""

    dcid: int
    rows: int
    columns: int

    @property
    def images(self) -> int:
        return self.rows * self.columns

    @property
    def grid(self) -> dict:
        return {"rows": self.rows, "columns": self.columns, "step_x_um": 10.0, "step_y_um": 10.0,
                "origin_x_mm": 1.0, "origin_y_mm": 2.0, "snaked": True, "plane": "xy"}

    def publish(self, settings: Settings, numbers: range, *, start: bool = False, end: bool = False) -> None:
        """Publish the scan's start, images ``numbers`` (20 to a transaction) and its end, as asked."""
        with EventPublisher(settings) as publisher:
            if start:
                publisher.publish([collection_started(self.dcid, file_template="/data/grid_######.cbf",
                                                      number_of_images=self.images, experiment_type="grid",
                                                      grid=self.grid)])
            for first in range(numbers.start, numbers.stop, 20):
                publisher.publish([image_arrived(self.dcid, n, f"/data/grid_{n:06d}.cbf")
                                   for n in range(first, min(first + 20, numbers.stop))])
            if end:
                publisher.publish([collection_ended(self.dcid, self.images)])


def changelog_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}workers-collections-changelog"


def reader_for(settings: Settings) -> TopicReader:
    return TopicReader(settings, ["results", "summaries"], [changelog_topic(settings)])


def result_count(reader: TopicReader, dcid: int) -> int:
    return len(reader.values("results", "ImageResult", dcid))


def wait_results(reader: TopicReader, dcid: int, at_least: int, timeout: float = 60) -> None:
    reader.wait_for(lambda: result_count(reader, dcid) >= at_least, timeout, f"{at_least} results")


def first_result_after(reader: TopicReader, moment: float) -> float | None:
    """Seconds from ``moment`` (epoch) to the first result the reader received after it."""
    later = [t for t in reader.received_at["results"] if t > moment]
    return min(later) - moment if later else None


def wait_members(settings: Settings, stage: str, members: int, timeout: float = 60) -> None:
    """Wait until the ``stage`` consumer group has ``members`` members, each with partitions."""
    admin = make_admin(settings)
    group = group_name(settings, stage)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            described = admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
        except (KafkaException, TimeoutError):  # the group or its coordinator not there yet
            time.sleep(0.2)
            continue
        if len([m for m in described.members if m.assignment.topic_partitions]) == members:
            return
        time.sleep(0.2)
    raise AssertionError(f"{group} did not reach {members} members with partitions in {timeout} s")


def check_exactly_once(fault: str, reader: TopicReader, settings: Settings, scan: Scan,
                       recovery_s: float | Callable[[], float | None] | None, **extra: object) -> None:
    """Wait for the summary, record the fault's counts (``recovery_s`` may be a function, asked once
    every result is in), then assert one result per image, one complete summary, and the table's last
    committed state equal to a fresh fold of the results."""
    reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", scan.dcid), 90, "the summary")
    try:  # a lost image fails below; this only waits for the reader to catch up
        reader.wait_for(lambda: len({r["image_number"] for r in reader.values("results", "ImageResult", scan.dcid)})
                        >= scan.images, 30, "every image's result")
    except AssertionError:
        pass
    time.sleep(2)  # a duplicate committed late would arrive by now
    results = reader.values("results", "ImageResult", scan.dcid)
    counts = Counter(r["image_number"] for r in results)
    duplicated = sorted(n for n, c in counts.items() if c > 1)
    lost = sorted(set(range(1, scan.images + 1)) - set(counts))
    if callable(recovery_s):
        recovery_s = recovery_s()
    record_fault(fault, images=scan.images, lost=len(lost), duplicated=sum(counts[n] - 1 for n in duplicated),
                 recovery_s=recovery_s, **extra)
    assert not duplicated, f"images with more than one result: {duplicated[:20]}"
    assert not lost, f"images without a result: {lost[:20]} ({len(lost)})"
    summaries = reader.values("summaries", "CollectionSummary", scan.dcid)
    assert len(summaries) == 1, f"{len(summaries)} summaries"
    assert summaries[0]["status"] == "complete" and summaries[0]["images_analysed"] == scan.images

    key = cs.state_key(scan.dcid, None).encode()
    stored = [value for k, value in reader.raw[changelog_topic(settings)] if k == key]
    assert stored, "no committed table state for the collection"
    fresh = cs.CollectionState(scan.dcid)
    cs.apply_start(fresh, {"experiment_type": "grid", "number_of_images": scan.images, "grid": scan.grid})
    for result in results:
        cs.apply_result(fresh, result)
    cs.apply_end(fresh, {"event_time": 0.0, "images_collected": scan.images})
    fresh.summarized = True
    assert cs.CollectionState.from_json(stored[-1]).comparable() == fresh.comparable()


def zombie_path(log: str) -> str:
    """How a zombie's batch in hand was kept from committing, as its log tells: the broker refused its commit
    (KIP-447), its producer was replaced (its call outlived the engine's per-call limit while it was stopped),
    or it dropped the batch on finding its partitions lost before it tried."""
    if any(refusal in log for refusal in REFUSALS):
        return "commit refused"
    if "starting a new producer" in log:
        return "producer replaced"
    return "batch dropped"


def stop_all(supervisor: Supervisor | None, workers: list[ServiceProcess], reader: TopicReader) -> None:
    if supervisor is not None:
        supervisor.stop()
    for worker in workers:
        worker.terminate()
    reader.close()


# -- a zombie --------------------------------------------------------------------------------
def test_a_zombie_worker_is_fenced(kafka_settings, tmp_path):
    """SIGSTOP a worker past its session timeout (10 s): the other takes its partitions over. On SIGCONT the
    zombie's batch in hand never commits (its offsets refused for its stale group generation, KIP-447, or its
    producer replaced and the batch rewound): nothing it produced after the rebalance is visible."""
    settings, scan = kafka_settings, Scan(710001, 15, 20)
    reader = reader_for(settings)
    workers = [ServiceProcess(settings, tmp_path, f"w{i}", *BUSY_WORKER, "--threads", "2",
                              "--log-level", "warning").start() for i in range(2)]
    zombie = workers[0]
    try:
        wait_members(settings, "analysis", 2)
        wait_members(settings, "collect", 2)
        scan.publish(settings, range(1, scan.images + 1), start=True)
        wait_results(reader, scan.dcid, 60)
        stopped_at = time.time()
        zombie.process.send_signal(signal.SIGSTOP)
        try:
            # The group expels it after its session timeout and the other worker takes every partition
            # (once the broker has aborted the zombie's open transaction, if it had one).
            wait_members(settings, "analysis", 1, timeout=40)
            wait_members(settings, "collect", 1, timeout=40)
            taken_over = time.time()
            wait_results(reader, scan.dcid, result_count(reader, scan.dcid) + 1)
        finally:
            zombie.process.send_signal(signal.SIGCONT)
        # The zombie finds it has lost its partitions (its commit refused or its queue dropped) and
        # rejoins; the scan ends while both work.
        wait_members(settings, "analysis", 2)
        scan.publish(settings, range(0), end=True)
        by_zombie = [r for r in reader.values("results", "ImageResult", scan.dcid)
                   if r["worker_id"].endswith(f":{zombie.process.pid}")]
        log = zombie.log_text()
        check_exactly_once("zombie worker", reader, settings, scan,
                           taken_over - stopped_at + first_result_after(reader, taken_over),
                           zombie_results=len(by_zombie), zombie_path=zombie_path(log))
        assert zombie.process.poll() is None, "the zombie should carry on after it is fenced"
        assert "session timed out" in log, f"the zombie was never expelled from its group: {log[-3000:]}"
    finally:
        stop_all(None, workers, reader)


# -- a stage stuck in a commit -----------------------------------------------------------------
@pytest.fixture
def own_broker(tmp_path_factory):
    """A broker of this test's own (it is SIGSTOPped: the session's broker serves other tests), topics applied."""
    home = tmp_path_factory.mktemp("home-own-broker")
    (home / OWNER_FILE).write_text(str(os.getpid()))  # conftest stops it if this session is killed
    base = load_settings(environ={}, home=home, local_kafka_port=free_port_pair())
    cluster = LocalCluster(base)
    cluster.up(progress=False)
    try:
        settings = load_settings(environ={}, bootstrap_servers=base.kafka_bootstrap, home=home,
                                 topic_prefix=f"t{uuid.uuid4().hex[:10]}.", image_partitions=4)
        apply_topics(settings)
        yield settings, cluster
    finally:
        pid = cluster.pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)  # a stopped broker cannot shut down
        cluster.down()


def test_a_stage_stuck_in_a_commit_exits_75_and_is_replaced(own_broker, tmp_path):
    """SIGSTOP the broker while the workers commit: a commit blocked past --stall-limit ends its worker with
    code 75; the supervisor starts it again and, with the broker back (SIGCONT), the scan finishes."""
    settings, cluster = own_broker
    scan = Scan(710002, 10, 20)
    reader = reader_for(settings)
    workers = [ServiceProcess(settings, tmp_path, f"w{i}", *BUSY_WORKER, "--threads", "1", "--stall-limit", "4",
                              "--log-level", "warning").start() for i in range(2)]
    supervisor = Supervisor(workers)
    broker = cluster.pid()
    try:
        wait_members(settings, "analysis", 2)
        scan.publish(settings, range(1, scan.images + 1), start=True)  # a backlog: both always mid-batch
        wait_results(reader, scan.dcid, 40)
        os.kill(broker, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and STALLED_EXIT_CODE not in [c for _, c in supervisor.restarts]:
                time.sleep(0.2)
        finally:
            os.kill(broker, signal.SIGCONT)
            resumed = time.time()
        codes = [code for _, code in supervisor.restarts]
        assert STALLED_EXIT_CODE in codes, f"no worker exited with {STALLED_EXIT_CODE}: {supervisor.restarts}"
        stalled = next(name for name, code in supervisor.restarts if code == STALLED_EXIT_CODE)
        stalled_log = next(w.log_text() for w in workers if w.name == stalled)
        assert "stage stalled in a Kafka transaction" in stalled_log
        scan.publish(settings, range(0), end=True)
        check_exactly_once("stage stalled in a commit", reader, settings, scan,
                           lambda: first_result_after(reader, resumed), exit_codes=codes)
    finally:
        stop_all(supervisor, workers, reader)


# -- a fenced producer ----------------------------------------------------------------------
def transactional_ids(settings: Settings, prefix: str) -> set[str]:
    """The transactional ids starting with ``prefix`` that the broker's transaction coordinator knows,
    read from its log (``__transaction_state``: each record's key is a version and the id, as a string)."""
    topic = "__transaction_state"
    consumer = make_consumer(settings, f"{settings.topic_prefix}txn-state-{uuid.uuid4().hex[:8]}",
                             read_committed=False, **{"enable.partition.eof": True})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        found: set[str] = set()
        at_end: set[int] = set()
        deadline = time.monotonic() + 30
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                at_end.add(message.partition())
                continue
            key = message.key()
            length = int.from_bytes(key[2:4], "big")
            transactional_id = key[4:4 + length].decode()
            if transactional_id.startswith(prefix):
                found.add(transactional_id)
        return found
    finally:
        consumer.close()


def test_a_fenced_producer_is_replaced_without_losing_the_batch(kafka_settings, tmp_path):
    """Fence the worker's transactional producers (a new producer with the same transactional.id): the
    next commit of each stage fails fatally; the worker starts a new producer, goes on, and loses nothing."""
    settings, scan = kafka_settings, Scan(710003, 10, 20)
    reader = reader_for(settings)
    worker = ServiceProcess(settings, tmp_path, "w0", *BUSY_WORKER, "--threads", "2",
                            "--log-level", "warning").start()
    try:
        wait_members(settings, "analysis", 1)
        wait_members(settings, "collect", 1)
        half = scan.images // 2
        scan.publish(settings, range(1, half + 1), start=True)
        wait_results(reader, scan.dcid, 30)
        fenced = {i for stage in ("analysis", "collect")
                  for i in transactional_ids(settings, f"{group_name(settings, stage)}-")}
        assert len(fenced) == 2, f"expected one transactional id per stage, found {sorted(fenced)}"
        fenced_at = time.time()
        for transactional_id in fenced:  # init_transactions bumps the epoch: the worker's producer is fenced
            make_producer(settings, transactional_id=transactional_id).flush(5)
        scan.publish(settings, range(half + 1, scan.images + 1), end=True)
        check_exactly_once("producer fenced", reader, settings, scan, lambda: first_result_after(reader, fenced_at))
        assert worker.process.poll() is None, "the worker should survive its producers being fenced"
        log = worker.log_text()
        assert log.count("starting a new producer") >= 2, log[-3000:]
        assert "fenced" in log.lower() or "epoch" in log.lower(), log[-3000:]
    finally:
        stop_all(None, [worker], reader)


# -- killed while restoring ------------------------------------------------------------------
#: Finished collections written into the changelog so that a worker's restore takes seconds.
FILLER_COLLECTIONS = 30_000


def fill_changelog(settings: Settings, collections: int) -> None:
    """Write ``collections`` finished 100-image grid scans into the collections changelog, as the worker's
    table writes them, in a few large transactions (a changelog of the size a busy beamline leaves)."""
    template = cs.CollectionState(1)
    cs.apply_start(template, {"experiment_type": "grid", "number_of_images": 100,
                              "grid": Scan(1, 10, 10).grid})
    for n in range(1, 101):
        cs.apply_result(template, {"dcid": 1, "image_number": n, "n_spots_no_ice": n % 40,
                                   "estimated_d_min": 2.0 + n / 100})
    cs.apply_end(template, {"event_time": time.time(), "images_collected": 100})
    template.summarized = True
    fields = json.loads(template.to_json())
    topic = changelog_topic(settings)
    partitions = settings.image_partitions
    producer = make_producer(settings, transactional_id=f"{settings.topic_prefix}filler-{uuid.uuid4().hex[:8]}",
                             **{"linger.ms": 20, "batch.num.messages": 10000})
    first = 9_000_000
    for chunk in range(first, first + collections, 5000):
        producer.begin_transaction()
        for dcid in range(chunk, min(chunk + 5000, first + collections)):
            value = json.dumps({**fields, "dcid": dcid}).encode()
            while True:
                try:
                    producer.produce(topic, value, cs.state_key(dcid, None).encode(), partition=dcid % partitions)
                    break
                except BufferError:
                    producer.poll(0.2)
        producer.commit_transaction(60)


def restored(log_text: str, table: str) -> list[dict]:
    """The worker's "table partitions restored" log records of ``table`` (a changelog topic)."""
    records = [json.loads(line) for line in log_text.splitlines()
               if line.startswith("{") and '"table partitions restored"' in line]
    return [r for r in records if r["table"] == table]


def test_a_worker_killed_while_its_table_restores(kafka_settings, tmp_path):
    """A worker with no checkpoint restores a big collections table; SIGKILL it mid-restore; the restarted
    worker restores again and finishes the scan: one summary, right, and nothing twice."""
    settings, scan = kafka_settings, Scan(710004, 10, 10)
    reader = reader_for(settings)
    args = ("--analysis", "noop", "--threads", "2", "--summary-timeout", "45", "--log-level", "info")
    first = ServiceProcess(settings, tmp_path, "first", *args, env={"BEAMSTREAM_HOME": str(tmp_path / "home-first")})
    # A replacement on another machine: no checkpoint, so its table comes from the changelog's start.
    second = ServiceProcess(settings, tmp_path, "second", *args,
                            env={"BEAMSTREAM_HOME": str(tmp_path / "home-second")})
    supervisor = None
    try:
        first.start()
        half = scan.images // 2
        scan.publish(settings, range(1, half + 1), start=True)
        key = cs.state_key(scan.dcid, None).encode()
        reader.wait_for(lambda: any(cs.CollectionState.from_json(v).n_seen == half
                                    for k, v in reader.raw[changelog_topic(settings)] if k == key),
                        60, "the collection's table state at half the scan")
        first.retired = True
        assert first.terminate() == 0
        fill_changelog(settings, FILLER_COLLECTIONS)

        second.start()
        supervisor = Supervisor([second])
        wait_members(settings, "collect", 1)  # assigned: the restore begins
        assigned_at = time.monotonic()
        time.sleep(fault_random("killed while restoring").uniform(0.1, 0.6))
        killed_after = time.monotonic() - assigned_at
        killed_at = time.time()
        second.kill()
        table = changelog_topic(settings)
        assert not restored(second.log_text(), table), "the restore finished before the kill"
        scan.publish(settings, range(half + 1, scan.images + 1), end=True)
        check_exactly_once("worker killed while restoring", reader, settings, scan,
                           lambda: summary_after(reader, scan.dcid, killed_at), filler=FILLER_COLLECTIONS,
                           killed_after_s=round(killed_after, 2))
        again = restored(second.log_text(), table)
        assert again and again[0]["records"] >= FILLER_COLLECTIONS, again
        # The kill came while the first run's restore was still reading: the same restore takes longer.
        assert again[0]["seconds"] > killed_after, (again[0]["seconds"], killed_after)
    finally:
        stop_all(supervisor, [first, second], reader)


def summary_after(reader: TopicReader, dcid: int, moment: float) -> float | None:
    """Seconds from ``moment`` (epoch) to the collection's summary."""
    for (_, value), received in zip(reader.records["summaries"], reader.received_at["summaries"], strict=True):
        if value.get("dcid") == dcid:
            return received - moment
    return None
