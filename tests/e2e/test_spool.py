"""Producers never lose an event: the spool while Kafka is unreachable, a broker killed under a running
simulation, a producer killed with a full spool, the watcher's timeout, `beamstream spool`, the dashboard.

The broker-fault tests stop and start a broker of their own (in a temporary home, on free ports), never
the session's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from beamstream.diffraction.synthetic import SyntheticSpec, generate_image
from beamstream.diffraction.writers import write_cbf
from beamstream.operations.cluster import LocalCluster
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import apply_topics, topic_name
from beamstream.producers.events import EventError, collection_ended, image_arrived
from beamstream.producers.publishing import SpooledPublisher
from beamstream.producers.scanning import cbf_file_name
from beamstream.producers.spool import inspect_spool, spool_root
from beamstream.producers.watcher import watch
from beamstream.schemas.serde import SerdeError, make_serde
from tests.conftest import OWNER_FILE
from tests.helpers.faults import record_fault
from tests.helpers.harness import ServiceProcess, Supervisor, TopicReader, free_port_pair, service_env, wait_until

SMALL = "eiger2-1m"


@pytest.fixture(scope="module")
def cbf_bytes(tmp_path_factory) -> bytes:
    image = generate_image(SyntheticSpec(detector="eiger2_1m"), seed=1, strength=0.5)
    return write_cbf(image, tmp_path_factory.mktemp("cbf") / "one.cbf").read_bytes()


def unreachable(home: Path, **extra) -> Settings:
    """Settings whose Kafka is a loopback port nobody listens on."""
    return load_settings(environ={}, bootstrap_servers=f"127.0.0.1:{free_port_pair()}", home=home,
                         topic_prefix=f"t{uuid.uuid4().hex[:10]}.", **extra)


def beamstream(settings: Settings, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "beamstream", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=service_env(settings, **(env or {})), **popen)


def read_events(settings: Settings, dcid: int, until, timeout: float = 120) -> list[dict]:
    """Every committed event of ``dcid`` on images and collections, from the start, with its Kafka timestamp
    (the drain thread's produce time, so the order batches were published in): read until ``until(events)``."""
    serde = make_serde(settings.schema_registry_url)
    consumer = make_consumer(settings, f"{settings.topic_prefix}check-{uuid.uuid4().hex}")
    consumer.subscribe([topic_name(settings, "images"), topic_name(settings, "collections")])
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(events):
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            decoded = serde.decode(message.value(), message.topic())
            if decoded.value.get("dcid") == dcid:
                events.append({"type": decoded.name, "ts": message.timestamp()[1], **decoded.value})
        time.sleep(1)  # a duplicate would be committed by now
        while (message := consumer.poll(1.0)) is not None:
            if not message.error():
                decoded = serde.decode(message.value(), message.topic())
                if decoded.value.get("dcid") == dcid:
                    events.append({"type": decoded.name, "ts": message.timestamp()[1], **decoded.value})
    finally:
        consumer.close()
    return events


def of_type(events: list[dict], record_type: str) -> list[dict]:
    return [e for e in events if e["type"] == record_type]


def complete(images: int):
    """``until`` for :func:`read_events`: every image and the collection's end seen."""
    return lambda events: (len({e["image_number"] for e in of_type(events, "ImageArrived")}) >= images
                           and of_type(events, "CollectionEnded"))


def assert_in_order(events: list[dict]) -> None:
    """Batches went out in the order they were spooled: start, images by number, end."""
    started, ended = of_type(events, "CollectionStarted"), of_type(events, "CollectionEnded")
    images = sorted(of_type(events, "ImageArrived"), key=lambda e: (e["ts"], e["image_number"]))
    assert [e["image_number"] for e in images] == sorted(e["image_number"] for e in images)
    assert started[0]["ts"] <= images[0]["ts"] and images[-1]["ts"] <= ended[0]["ts"]


def lost_and_duplicated(events: list[dict], images: int) -> tuple[int, int]:
    counts = Counter(e["image_number"] for e in of_type(events, "ImageArrived"))
    lost = len(set(range(1, images + 1)) - set(counts))
    return lost, sum(c - 1 for c in counts.values())


# -- a broker of this module's own, to stop and kill -----------------------------------------------------

@pytest.fixture(scope="module")
def own_broker(tmp_path_factory):
    home = tmp_path_factory.mktemp("home-spool-broker")  # home*: conftest stops it if this session dies
    (home / OWNER_FILE).write_text(str(os.getpid()))
    cluster = LocalCluster(load_settings(environ={}, home=home, local_kafka_port=free_port_pair()))
    cluster.up(progress=False)
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def broker(own_broker, tmp_path) -> tuple[Settings, LocalCluster]:
    """Settings on the module's broker (running), with topics of this test's own and a home of its own."""
    own_broker.up(progress=False)  # a test before may have left it stopped
    settings = load_settings(environ={}, bootstrap_servers=own_broker.bootstrap, home=tmp_path / "home",
                             topic_prefix=f"t{uuid.uuid4().hex[:10]}.", image_partitions=4)
    apply_topics(settings)
    return settings, own_broker


@pytest.mark.kafka
@pytest.mark.fault
def test_a_simulation_goes_on_while_the_broker_is_killed_and_loses_nothing(broker, tmp_path):
    settings, cluster = broker
    rows, columns, dcid = 5, 8, 880001
    images = rows * columns
    out = tmp_path / "data"
    reader = TopicReader(settings, ["images", "summaries"])
    worker = ServiceProcess(settings, tmp_path, "w0", "--analysis", "noop", "--threads", "2",
                            "--summary-timeout", "60", "--log-level", "warning").start()
    supervisor = Supervisor([worker])  # a worker wedged by the restart exits 75 and is started again
    simulation = beamstream(settings, "simulate", "gridscan", "--rows", str(rows), "--cols", str(columns),
                            "--rate", "8", "--detector", SMALL, "--format", "cbf", "--out", str(out),
                            "--dcid", str(dcid), "--spool", "sim", "--drain-timeout", "300", "--json")
    try:
        reader.wait_for(lambda: len(reader.values("images", "ImageArrived", dcid)) >= 8, 120, "8 image events")
        cluster.kill()  # SIGKILL, mid-scan
        # The scan goes on and ends while the broker is down: every file written, the events spooled.
        wait_until(lambda: len(list(out.glob(f"grid_{dcid}_*.cbf"))) == images, 120, "every file written")
        # Some of the scan's events: the rest went out before the kill, how many depends on the load (the
        # reader that saw 8 may lag the producer); the checks below find any event lost on either side.
        wait_until(lambda: inspect_spool(spool_root(settings) / "sim").events > 0, 30, "a spooled backlog")
        spooled = inspect_spool(spool_root(settings) / "sim")
        assert spooled.holder_pid == simulation.pid
        listed = subprocess.run([sys.executable, "-m", "beamstream", "spool", "list", "--json"], text=True,
                                capture_output=True, env=service_env(settings), timeout=60)
        assert [(s["name"], s["holder_pid"]) for s in json.loads(listed.stdout)] == [("sim", simulation.pid)]
        time.sleep(3)  # down past the end of the scan
        assert simulation.poll() is None  # waiting for Kafka, not giving up on images
        cluster.up(progress=False)
        back = time.time()

        stdout, stderr = simulation.communicate(timeout=300)
        assert simulation.returncode == 0, stderr
        report = json.loads(stdout)
        assert report["status"] == "success" and report["emitted"] == images and report["missing"] == []
        assert report["spool"]["batches"] == 0
        assert "never arrived" not in stderr and "waiting for Kafka" in stderr

        events = read_events(settings, dcid, complete(images))
        lost, duplicated = lost_and_duplicated(events, images)
        assert Counter(e["image_number"] for e in of_type(events, "ImageArrived")) == Counter(range(1, images + 1))
        ended = of_type(events, "CollectionEnded")
        assert len(ended) == 1 and ended[0]["status"] == "success" and ended[0]["images_collected"] == images
        assert len(of_type(events, "CollectionStarted")) == 1
        assert_in_order(events)
        recovery_s = max(e["ts"] for e in events) / 1000 - back

        reader.wait_for(lambda: reader.values("summaries", "CollectionSummary", dcid), 300, "the summary")
        summary = reader.values("summaries", "CollectionSummary", dcid)[0]
        assert summary["status"] == "complete" and summary["images_analysed"] == images, summary
        record_fault("producer spool: broker SIGKILLed mid-scan, down past its end", images=images, lost=lost,
                     duplicated=duplicated, recovery_s=recovery_s, worker_restarts=len(supervisor.restarts))
    finally:
        if simulation.poll() is None:
            simulation.kill()
        supervisor.stop()
        worker.terminate()
        reader.close()


@pytest.mark.kafka
@pytest.mark.fault
def test_a_producer_killed_with_a_full_spool_loses_nothing_when_restarted(broker, tmp_path):
    settings, cluster = broker
    first, second = 880002, 880003
    cluster.down()  # Kafka unreachable from the start
    killed = beamstream(settings, "simulate", "gridscan", "--rows", "3", "--cols", "4", "--rate", "20",
                        "--detector", SMALL, "--format", "cbf", "--out", str(tmp_path / "a"), "--dcid", str(first),
                        "--spool", "beamline", "--json")
    try:
        # CollectionStarted, 12 images in however many polls, CollectionEnded: all spooled, none published.
        spool = spool_root(settings) / "beamline"
        wait_until(lambda: inspect_spool(spool).events == 14, 180, "14 events spooled")
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    finally:
        if killed.poll() is None:
            killed.kill()
    left = inspect_spool(spool)
    assert (left.events, left.holder_pid) == (14, None)

    cluster.up(progress=False)
    restarted_at = time.time()
    again = beamstream(settings, "simulate", "gridscan", "--rows", "2", "--cols", "2", "--rate", "20",
                       "--detector", SMALL, "--format", "cbf", "--out", str(tmp_path / "b"), "--dcid", str(second),
                       "--spool", "beamline", "--json")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert json.loads(stdout)["spool"]["events"] == 0 and inspect_spool(spool).events == 0

    events = read_events(settings, first, complete(12))
    lost, duplicated = lost_and_duplicated(events, 12)
    assert (lost, duplicated) == (0, 0)
    assert of_type(events, "CollectionEnded")[0]["status"] == "success"
    assert_in_order(events)
    later = read_events(settings, second, complete(4))
    # What the killed run left went out first.
    assert max(e["ts"] for e in events) <= min(e["ts"] for e in later)
    record_fault("producer SIGKILLed with a full spool, restarted", images=12, lost=lost, duplicated=duplicated,
                 recovery_s=max(e["ts"] for e in events) / 1000 - restarted_at)


@pytest.mark.kafka
@pytest.mark.fault
def test_a_fenced_producer_is_replaced_and_its_batch_published_again(kafka_settings, tmp_path):
    settings = load_settings(environ={}, bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4)
    with SpooledPublisher(settings, "fenced") as publisher:
        publisher.publish([image_arrived(77, 1, "/d/x_0001.cbf")])
        assert publisher.wait_drained(60)
        # Another producer with the spool's transactional id: the publisher's own is fenced (a fatal error).
        make_producer(settings, transactional_id=publisher.transactional_id)
        fenced_at = time.time()
        publisher.publish([image_arrived(77, n, f"/d/x_{n:04d}.cbf") for n in (2, 3)])
        assert publisher.wait_drained(120)
        assert publisher.backlog().connected
    events = read_events(settings, 77, lambda e: len(of_type(e, "ImageArrived")) >= 3)
    lost, duplicated = lost_and_duplicated(events, 3)
    assert (lost, duplicated) == (0, 0)
    record_fault("producer fenced (fatal error): replaced, batch published again", images=3, lost=lost,
                 duplicated=duplicated, recovery_s=max(e["ts"] for e in events) / 1000 - fenced_at)


# -- the watcher's timeout --------------------------------------------------------------------------------

def test_the_watch_timeout_does_not_run_while_kafka_is_unreachable(tmp_path, cbf_bytes):
    template = tmp_path / "x_####.cbf"
    cbf_file_name(template, 1).write_bytes(cbf_bytes)
    publisher = SpooledPublisher(unreachable(tmp_path / "home"), "w")
    stop = threading.Event()
    timer = threading.Timer(4.0, stop.set)
    timer.start()
    try:
        report = watch(publisher, 5, str(template), 3, timeout_s=0.5, poll_s=0.05, stop=stop)
        assert report.stopped and not report.timed_out and report.emitted == 1 and report.missing == [2, 3]
        backlog = publisher.backlog()
        assert (backlog.events, backlog.connected) == (1, False)
        assert "127.0.0.1" in backlog.last_error
    finally:
        timer.cancel()
        left = publisher.close(timeout=0)
    assert left.events == 1  # kept for the next publisher on the spool


@pytest.mark.kafka
def test_the_watch_timeout_runs_while_kafka_takes_the_events(kafka_settings, tmp_path, cbf_bytes):
    template = tmp_path / "x_####.cbf"
    cbf_file_name(template, 1).write_bytes(cbf_bytes)
    settings = load_settings(environ={}, bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4)
    stop = threading.Event()
    timer = threading.Timer(60.0, stop.set)  # only if the timeout never fires
    timer.start()
    try:
        with SpooledPublisher(settings, "w") as publisher:
            report = watch(publisher, 6, str(template), 3, timeout_s=0.5, poll_s=0.05, stop=stop, end=True)
            assert report.timed_out and not report.stopped and report.emitted == 1
            assert publisher.wait_drained(60)
    finally:
        timer.cancel()
    events = read_events(settings, 6, lambda e: of_type(e, "CollectionEnded"))
    assert [e["image_number"] for e in of_type(events, "ImageArrived")] == [1]
    assert of_type(events, "CollectionEnded")[0]["status"] == "incomplete"


def test_a_bad_event_is_refused_at_once_and_nothing_is_spooled(tmp_path):
    publisher = SpooledPublisher(unreachable(tmp_path / "home"), "bad")
    try:
        with pytest.raises((EventError, SerdeError)):
            publisher.publish([image_arrived(1, 1, "/d/x_0001.cbf"), collection_ended(1, 1, status=7)])
        with pytest.raises(EventError):
            image_arrived(1, 0, "/d/x.cbf")
        assert publisher.backlog().batches == 0
        assert publisher.publish([image_arrived(1, 1, "/d/x_0001.cbf")]) == 1  # no Kafka needed to accept it
        assert publisher.backlog().events == 1
    finally:
        publisher.close(timeout=0)


# -- the command line: watch without Kafka, spool list and drain, metrics, a busy spool ---------------------

@pytest.mark.kafka
def test_watch_without_kafka_keeps_its_events_and_spool_drain_publishes_them(kafka_settings, tmp_path, cbf_bytes):
    settings = load_settings(environ={}, bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4)
    dead = f"127.0.0.1:{free_port_pair()}"
    template = tmp_path / "run" / "x_####.cbf"
    template.parent.mkdir()
    for n in (1, 2):
        cbf_file_name(template, n).write_bytes(cbf_bytes)
    port = free_port_pair()
    process = beamstream(settings, "watch", "--dcid", "4711", "--template", str(template), "--images", "3",
                         "--timeout", "1", "--end", "--spool", "cli", "--metrics-port", str(port), "--json",
                         env={"BEAMSTREAM_BOOTSTRAP_SERVERS": dead})
    try:
        def scraped() -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                return ""
        wait_until(lambda: 'beamstream_producer_spool_events{spool="cli"} 2.0' in scraped(), 60, "the gauge")
        assert 'beamstream_producer_kafka_connected{spool="cli"} 0.0' in scraped()
        time.sleep(2)  # twice the --timeout: it must not fire while Kafka is unreachable
        assert process.poll() is None
        # A second producer on the same spool is refused, naming the holder.
        busy = subprocess.run([sys.executable, "-m", "beamstream", "spool", "drain", "cli"], text=True,
                              capture_output=True, env=service_env(settings), timeout=60)
        assert busy.returncode == 2 and busy.stderr.count("\n") == 1
        assert f"in use by process {process.pid}" in busy.stderr
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    report = json.loads(stdout)
    assert report["stopped"] and not report["timed_out"] and report["emitted"] == 2
    assert report["spool"]["events"] == 3  # two images and the end
    kept = [line for line in stderr.splitlines() if "kept in spool" in line]
    assert kept == [f"3 events kept in spool {spool_root(settings) / 'cli'}: published by the next run on spool "
                    "cli or by `beamstream spool drain cli`"]

    listed = subprocess.run([sys.executable, "-m", "beamstream", "spool", "list"], text=True, capture_output=True,
                            env=service_env(settings), timeout=60)
    assert listed.returncode == 0 and listed.stdout.splitlines()[2].split()[:3] == ["cli", "3", "2"]
    drained = subprocess.run([sys.executable, "-m", "beamstream", "spool", "drain", "cli", "--json"], text=True,
                             capture_output=True, env=service_env(settings), timeout=120)
    assert drained.returncode == 0, drained.stderr
    assert json.loads(drained.stdout)["published_events"] == 3
    assert inspect_spool(spool_root(settings) / "cli").events == 0
    events = read_events(settings, 4711, lambda e: of_type(e, "CollectionEnded"))
    assert sorted(e["image_number"] for e in of_type(events, "ImageArrived")) == [1, 2]
    assert of_type(events, "CollectionEnded")[0]["status"] == "incomplete"


def test_spool_commands_refuse_bad_names_in_one_line(tmp_path):
    settings = unreachable(tmp_path / "home")
    for args, message in ((("spool", "drain", "nothing-here"), "no spool nothing-here under"),
                          (("spool", "drain", "../x"), "spool name")):
        result = subprocess.run([sys.executable, "-m", "beamstream", *args], text=True, capture_output=True,
                                env=service_env(settings), timeout=60)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.kafka
def test_the_dashboard_shows_this_hosts_spools(kafka_settings, tmp_path):
    from beamstream.dashboard.server import DashboardServer

    settings = load_settings(environ={}, bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4)
    waiting = SpooledPublisher(unreachable(tmp_path / "home"), "gda")  # the same home: this host's spools
    waiting.publish([image_arrived(9, n, f"/d/x_{n:04d}.cbf") for n in (1, 2, 3)])
    try:
        with DashboardServer(settings, port=0) as server:
            pipeline = json.loads(urllib.request.urlopen(server.url + "api/pipeline", timeout=30).read())
        (spool,) = pipeline["spools"]
        assert (spool["name"], spool["events"], spool["batches"]) == ("gda", 3, 1)
        assert spool["holder_pid"] is not None and spool["oldest_age_s"] >= 0
    finally:
        waiting.close(timeout=0)
