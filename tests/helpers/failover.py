"""A three-node local cluster for failover tests and the failover benchmark: ports for it, who leads
which partition, and a grid scan run through real workers while the busiest leader is SIGKILLed.

Nothing in the product imports this module."""

from __future__ import annotations

import os
import random
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from beamstream.operations.cluster import LocalCluster
from beamstream.platform.kafka_clients import make_admin, make_consumer
from beamstream.platform.processes import port_is_free
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import apply_topics, declared_topics, topic_name
from tests.conftest import OWNER_FILE
from tests.e2e.test_pipeline_eos import N_IMAGES, WORKER_ARGS, publish_gridscan
from tests.helpers.faults import longest_pause
from tests.helpers.harness import ServiceProcess, Supervisor, TopicReader

TRANSACTION_STATE = "__transaction_state"


def free_port_run(count: int) -> int:
    """A port p such that p .. p+count-1 are all free on loopback (a several-node cluster's ports).

    Chosen below the kernel's ephemeral range: a port from there (what binding port 0 gives) can be taken by
    any outgoing connection on the machine before the node binds it, and six ports made that likely."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(max(1024, low - 12000), low - count)
        if all(port_is_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def start_three_nodes(home: Path) -> LocalCluster:
    """A running three-node local cluster in ``home`` on free ports."""
    cluster = LocalCluster(load_settings(environ={}, home=home, local_kafka_port=free_port_run(6),
                                         local_kafka_nodes=3))
    cluster.up(progress=False)
    return cluster


@pytest.fixture(scope="session")
def three_node_cluster(tmp_path_factory):
    """A three-node local cluster for the session, started only when a test asks for it (import this fixture
    into the test module). Tests kill its nodes; :func:`three_node_settings` brings them back."""
    home = tmp_path_factory.mktemp("home-3nodes")
    (home / OWNER_FILE).write_text(str(os.getpid()))  # a killed session's nodes are stopped by the next
    cluster = start_three_nodes(home)
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def three_node_settings(three_node_cluster) -> Settings:
    """Settings for the three-node cluster with every node up and in sync, topics of this test's own."""
    three_node_cluster.up(progress=False)  # restarts a node an earlier test killed
    settings = fresh_settings(three_node_cluster)
    wait_fully_replicated(settings)
    return settings


def fresh_settings(cluster: LocalCluster, partitions: int = 6) -> Settings:
    """Settings for ``cluster`` (every node a bootstrap server) with a topic prefix of their own, topics applied
    with the cluster's default replication (3)."""
    settings = load_settings(environ={}, bootstrap_servers=cluster.bootstrap, home=cluster.settings.home,
                             topic_prefix=f"f{uuid.uuid4().hex[:10]}.", image_partitions=partitions)
    apply_topics(settings)
    # Each node learns of the new topics from the controller on its own time; ask until the metadata has them.
    names = {spec.name(settings) for spec in declared_topics(settings)}
    admin = make_admin(settings)
    deadline = time.monotonic() + 30
    while not names <= set(admin.list_topics(timeout=10).topics):
        assert time.monotonic() < deadline, f"the cluster's metadata still lacks {names} after 30 s"
        time.sleep(0.2)
    return settings


def partition_leaders(settings: Settings, topics: list[str], timeout: float = 30.0) -> dict[tuple[str, int], int]:
    """(topic, partition) -> id of the node leading it, from the cluster's metadata. Each node answers
    from its own copy of the metadata, which learns of a new topic or leader on its own time: ask until
    an answer names a leader for every partition of ``topics``."""
    admin = make_admin(settings)
    deadline = time.monotonic() + timeout
    while True:
        metadata = admin.list_topics(timeout=10)
        known = [metadata.topics[topic] for topic in topics if topic in metadata.topics]
        if len(known) == len(topics) and all(p.leader >= 0 for topic in known for p in topic.partitions.values()):
            return {(topic.topic, number): partition.leader
                    for topic in known for number, partition in topic.partitions.items()}
        assert time.monotonic() < deadline, f"no leader for every partition of {topics} after {timeout:.0f} s"
        time.sleep(0.2)


def wait_fully_replicated(settings: Settings, nodes: int = 3, timeout: float = 60.0) -> None:
    """Wait until every partition of every topic (internal ones too) has all ``nodes`` replicas in sync: a node
    restarted after a kill catches up first, or killing another would leave writes short of min.insync.replicas."""
    admin = make_admin(settings)
    deadline = time.monotonic() + timeout
    short: list = []
    while time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=10)
        short = [(name, number) for name, topic in metadata.topics.items()
                 for number, partition in topic.partitions.items()
                 if len(partition.replicas) >= nodes and len(partition.isrs) < nodes]
        if not short and len(metadata.brokers) >= nodes:
            return
        time.sleep(0.5)
    raise AssertionError(f"partitions still short of in-sync replicas after {timeout:.0f} s: {short[:5]}")


def transaction_partitions(settings: Settings, prefix: str) -> dict[str, int]:
    """Transactional id -> its partition of ``__transaction_state``, for the ids starting with ``prefix``.

    The ids of workers end in a random suffix, so they are read off the transaction log itself (its key is a
    version, int16, then the id as an int16-length string)."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}txn-reader-{uuid.uuid4().hex}",
                             read_committed=False)
    admin_metadata = make_admin(settings).list_topics(TRANSACTION_STATE, timeout=10)
    partitions = list(admin_metadata.topics[TRANSACTION_STATE].partitions)
    ends = {p: consumer.get_watermark_offsets(TopicPartition(TRANSACTION_STATE, p), timeout=10)[1]
            for p in partitions}
    consumer.assign([TopicPartition(TRANSACTION_STATE, p, 0) for p in partitions if ends[p] > 0])
    found: dict[str, int] = {}
    done: set[int] = {p for p in partitions if ends[p] == 0}
    deadline = time.monotonic() + 20
    try:
        while len(done) < len(partitions) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            if message.offset() >= ends[message.partition()] - 1:
                done.add(message.partition())
            key = message.key() or b""
            if len(key) >= 4:
                length = struct.unpack(">h", key[2:4])[0]
                transactional_id = key[4:4 + length].decode(errors="replace")
                if transactional_id.startswith(prefix):
                    found[transactional_id] = message.partition()
    finally:
        consumer.close()
    return found


@dataclass
class Leadership:
    """What each node leads of the scan's path: image and result partitions, the transaction-state
    partitions of the deployment's transactional ids (workers' and publisher's)."""

    images: Counter = field(default_factory=Counter)
    results: Counter = field(default_factory=Counter)
    transactions: Counter = field(default_factory=Counter)

    def total(self, node: int) -> int:
        return self.images[node] + self.results[node] + self.transactions[node]

    def busiest(self, rng) -> int:
        """The node leading most (ties broken by ``rng``, the fault's seeded random)."""
        nodes = set(self.images) | set(self.results) | set(self.transactions)
        most = max(self.total(node) for node in nodes)
        return rng.choice(sorted(node for node in nodes if self.total(node) == most))

    def describe(self, node: int) -> str:
        return (f"node {node}: leader of {self.images[node]} image, {self.results[node]} result and "
                f"{self.transactions[node]} transaction-state partition(s)")


def leadership(settings: Settings) -> Leadership:
    """Who leads the image, result and (deployment's) transaction-state partitions now."""
    images, results = topic_name(settings, "images"), topic_name(settings, "results")
    leaders = partition_leaders(settings, [images, results, TRANSACTION_STATE])
    counts = Leadership()
    for (topic, _), leader in leaders.items():
        if topic == images:
            counts.images[leader] += 1
        elif topic == results:
            counts.results[leader] += 1
    for partition in set(transaction_partitions(settings, settings.topic_prefix).values()):
        counts.transactions[leaders[(TRANSACTION_STATE, partition)]] += 1
    return counts


@dataclass
class FailoverOutcome:
    """One grid scan with its busiest leader SIGKILLed: what was killed, and what arrived."""

    node: int
    led: str
    images: int
    lost: int
    duplicated: int
    summaries: int
    recovery_s: float
    restarts: list
    reader: TopicReader


def scan_with_leader_killed(settings: Settings, cluster: LocalCluster, log_dir: Path, dcid: int, rng,
                            kill_after: int = 100, rate_hz: float = 25.0) -> FailoverOutcome:
    """Run a grid scan (``tests.e2e.test_pipeline_eos``'s 300 images at ``rate_hz``) through two real workers;
    after ``kill_after`` results, SIGKILL the node leading most of its path and leave it down. Waits for the
    summary, then counts results. The caller closes ``outcome.reader``."""
    reader = TopicReader(settings, ["images", "results", "summaries"],
                         [f"{settings.topic_prefix}workers-collections-changelog"])
    workers = [ServiceProcess(settings, log_dir, f"w{dcid}-{i}", *WORKER_ARGS).start() for i in range(2)]
    supervisor = Supervisor(workers)
    try:
        publisher = publish_gridscan(settings, dcid, rate_hz=rate_hz)
        reader.wait_for(lambda: len(reader.values("results", "ImageResult", dcid)) >= kill_after, 60,
                        f"{kill_after} results")
        led = leadership(settings)
        node = led.busiest(rng)
        killed_at = time.time()
        cluster.kill(node)
        publisher.join(120)
        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", dcid), 120, "the summary")
        # Results committed before the summary may reach this reader a moment later; a lost one stays lost.
        wait_quietly(reader, lambda: len(reader.values("results", "ImageResult", dcid)) >= N_IMAGES, 20)
        time.sleep(2)  # for any duplicate to show
        return FailoverOutcome(node, led.describe(node), N_IMAGES, *_count(reader, dcid),
                               recovery_s=longest_pause(_result_times(reader, dcid), killed_at),
                               restarts=list(supervisor.restarts), reader=reader)
    except BaseException:
        reader.close()
        raise
    finally:
        supervisor.stop()
        for worker in workers:
            worker.terminate()


def wait_quietly(reader: TopicReader, predicate, timeout: float) -> None:
    """Wait up to ``timeout`` for ``predicate``; carry on either way (what is missing is counted after)."""
    try:
        reader.wait_for(predicate, timeout, "")
    except AssertionError:
        pass


def _count(reader: TopicReader, dcid: int) -> tuple[int, int, int]:
    counts = Counter(r["image_number"] for r in reader.values("results", "ImageResult", dcid))
    lost = len(set(range(1, N_IMAGES + 1)) - set(counts))
    duplicated = sum(c - 1 for c in counts.values())
    return lost, duplicated, len(reader.values("summaries", "CollectionSummary", dcid))


def _result_times(reader: TopicReader, dcid: int) -> list[float]:
    return [at for at, _ in reader.arrivals("results", dcid=dcid)]
