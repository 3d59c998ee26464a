"""Every command with Kafka out of reach: one line, exit code 2, within seconds; bad arguments first.

Each command runs as a person runs it, a ``beamstream`` process, with the bootstrap servers
pointed at a closed port. Before ``require_kafka`` (beamstream/platform/kafka_clients.py) a
command waited for librdkafka's 30 s metadata timeout, and a service for its producer's, while
librdkafka narrated each failed connection. The commands run two at a time, in threads, so
the file takes about half the sum of their start-up times.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from beamstream.cli.main import COMMAND_MODULES
from beamstream.platform.kafka_clients import KafkaUnreachable, require_kafka
from beamstream.platform.settings import load_settings

#: A behaviour bound, not a benchmark: the probe answers within seconds, the old wait was 30 s or more.
BOUND_S = 20.0
#: The collection `go` reprocesses (written into the temporary ISPyB database).
DCID = 4242

#: Every command that talks to Kafka, with arguments that are fine in themselves.
KAFKA_COMMANDS = {
    "topics list": ("topics", "list"),
    "topics apply": ("topics", "apply"),
    "dlq list": ("dlq", "list"),
    "dlq show": ("dlq", "show", "0:1"),
    "dlq reinject": ("dlq", "reinject", "--all", "--yes"),
    "dlq purge": ("dlq", "purge", "--yes"),
    "replay": ("replay", "--topic", "images", "--from-offset", "0", "--yes"),
    "go": ("go", str(DCID)),
    "worker": ("worker",),
    "ispyb-sink": ("ispyb-sink",),
    "archiver": ("archiver",),
    "bluesky-bridge": ("bluesky-bridge", "--topic", "i03.bluesky.runengine.documents"),
    "feedback": ("feedback", "--udp", "127.0.0.1:9877"),
    "monitor": ("monitor", "--max-workers", "2"),
    "monitor observing": ("monitor", "--observe-only"),
    "dashboard": ("dashboard", "--port", "0"),
    "demo": ("demo", "--no-dashboard"),
}
#: Commands that never talk to Kafka.
NO_KAFKA = {"cluster", "config", "analyse", "ispyb_schema"}
#: Producers that keep running while Kafka is down, spooling events to disk (tested with the spool).
KEEP_RUNNING = {"watch", "simulate", "spool"}

#: Bad arguments, each refused before anything connects: (arguments, what the error must say).
BAD_ARGUMENTS = {
    "dlq id": (("dlq", "show", "seven"), "bad dead-letter id 'seven': expected PARTITION:OFFSET"),
    "dlq reinject id": (("dlq", "reinject", "0:1", "x:2", "--yes"), "bad dead-letter id 'x:2'"),
    "dlq ids and --all": (("dlq", "reinject", "0:1", "--all"), "or pass --all, not both"),
    "dlq since": (("dlq", "list", "--since", "yesterday"), "argument --since: expected an ISO 8601 time"),
    "replay topic": (("replay", "--topic", "nosuch", "--from-offset", "0"), "no declared topic 'nosuch'"),
    "replay offsets": (("replay", "--topic", "images", "--from-offset", "5", "--to-offset", "5"),
                       "--to-offset 5 is not after --from-offset 5"),
    "replay times": (("replay", "--topic", "images", "--from-time", "2026-01-02T00:00Z",
                      "--to-time", "2026-01-01T00:00Z"), "--to-time 2026-01-01T00:00:00+00:00 is not after"),
    "replay dcid": (("replay", "--topic", "images", "--from-offset", "0", "--dcid", "-3"),
                    "argument --dcid: a dcid is positive, got -3"),
    "go dcid": (("go", "0"), "argument DCID: a dcid is positive, got 0"),
    "go unknown dcid": (("go", "999999"), "999999"),
    "worker threads": (("worker", "--threads", "0"), "argument --threads: must be at least 1, got 0"),
    "worker simulated time": (("worker", "--simulated-analysis-time", "1"),
                              "--simulated-analysis-time needs --analysis noop"),
    "ispyb-sink batch": (("ispyb-sink", "--batch-size", "0"), "argument --batch-size: must be between 1"),
    "archiver metrics port": (("archiver", "--metrics-port", "0"), "argument --metrics-port: expected a port"),
    "bluesky-bridge topic": (("bluesky-bridge", "--topic", "i03 documents"),
                             "argument --topic: expected a topic name"),
    "feedback address": (("feedback", "--udp", "gda-host"), "expected HOST:PORT for the GDA listener"),
    "monitor bounds": (("monitor", "--min-workers", "5", "--max-workers", "2"),
                       "--max-workers must be >= --min-workers"),
    "monitor worker args": (("monitor", "--worker-args", '"--analysis'), "--worker-args:"),
    "dashboard port": (("dashboard", "--port", "70000"), "argument --port: expected a port number"),
    "demo detector": (("demo", "--detector", "eiger9-100m"), "eiger9-100m"),
}


@dataclass(frozen=True)
class Run:
    """What one command did: exit code, output, and how long it took."""

    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: tuple[str, ...], env: dict[str, str]) -> Run:
    started = time.monotonic()
    # stdin closed: a command that asked for confirmation would otherwise wait for the terminal.
    done = subprocess.run([sys.executable, "-m", "beamstream", *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def _ispyb_with_a_collection(home: Path) -> None:
    from beamstream.connectors.ispyb_collections import create_collection
    from beamstream.connectors.ispyb_schema import create_schema, make_engine

    engine = make_engine(load_settings({}, home=home).database_url)
    create_schema(engine)
    create_collection(engine, dcid=DCID, file_template=str(home / "x_######.cbf"), number_of_images=3)
    engine.dispose()


@pytest.fixture(scope="module")
def unreachable_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a deployment whose Kafka is down: a closed bootstrap port, a temporary home
    with an ISPyB database (so `ispyb-sink` and `go` get as far as Kafka)."""
    home = tmp_path_factory.mktemp("unreachable-home")
    _ispyb_with_a_collection(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMSTREAM_")}
    env.update(BEAMSTREAM_HOME=str(home), BEAMSTREAM_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}",
               BEAMSTREAM_DATA_ROOTS=str(home))
    return env


@pytest.fixture(scope="module")
def runs(unreachable_env) -> dict[str, Run]:
    """Every case of this file run once, two at a time (each test below checks one)."""
    cases = {**{name: args for name, args in KAFKA_COMMANDS.items()},
             **{f"bad {name}": args for name, (args, _) in BAD_ARGUMENTS.items()}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, args, unreachable_env) for name, args in cases.items()}
        return {name: future.result() for name, future in futures.items()}


def test_every_command_is_covered() -> None:
    """A new command must be added here: either it talks to Kafka and is tested below, or it says why not."""
    tested = {args[0].replace("-", "_") for args in KAFKA_COMMANDS.values()}
    assert tested.isdisjoint(NO_KAFKA | KEEP_RUNNING)
    assert set(COMMAND_MODULES) - KEEP_RUNNING == (tested | NO_KAFKA) - KEEP_RUNNING


@pytest.mark.parametrize("name", list(KAFKA_COMMANDS))
def test_unreachable_kafka_is_one_line_and_exit_2(name, runs, unreachable_env) -> None:
    run = runs[name]
    command = KAFKA_COMMANDS[name][0]
    bootstrap = unreachable_env["BEAMSTREAM_BOOTSTRAP_SERVERS"]
    assert run.returncode == 2, (run.returncode, run.stderr[-1000:])
    assert run.stderr.count("\n") == 1, run.stderr[-3000:]
    assert run.stderr.startswith(f"beamstream {command}: error: cannot reach Kafka at {bootstrap} "
                                 f"(Connect to ipv4#{bootstrap} failed: Connection refused); "), run.stderr
    assert "BEAMSTREAM_BOOTSTRAP_SERVERS" in run.stderr  # what to do about it
    assert run.elapsed_s < BOUND_S, f"{name} took {run.elapsed_s:.1f} s"


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_a_bad_argument_is_refused_before_connecting(name, runs) -> None:
    run = runs[f"bad {name}"]
    _, expected = BAD_ARGUMENTS[name]
    assert run.returncode == 2, (run.returncode, run.stderr[-1000:])
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert expected in run.stderr
    # Kafka is unreachable: a command that asked it anything first would have said so instead.
    assert "Kafka" not in run.stderr


def test_the_local_cluster_not_running_says_how_to_start_it(tmp_path) -> None:
    settings = load_settings({}, home=tmp_path, local_kafka_port=closed_port())
    with pytest.raises(KafkaUnreachable, match=r"start the local cluster with `beamstream cluster up`"):
        require_kafka(settings)


def test_an_unknown_host_is_named(tmp_path) -> None:
    settings = load_settings({}, home=tmp_path, bootstrap_servers="kafka.invalid:9092")
    with pytest.raises(KafkaUnreachable) as refused:
        require_kafka(settings)
    assert "cannot reach Kafka at kafka.invalid:9092 (Failed to resolve 'kafka.invalid:9092'" in str(refused.value)


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung broker, a firewall that holds)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()


def test_a_cluster_that_never_answers_is_given_up_on_after_the_timeout(tmp_path, silent_listener) -> None:
    settings = load_settings({}, home=tmp_path, bootstrap_servers=f"127.0.0.1:{silent_listener}")
    started = time.monotonic()
    with pytest.raises(KafkaUnreachable, match=r"\(no answer within 2 s\)"):
        require_kafka(settings, timeout_s=2)
    assert time.monotonic() - started < BOUND_S


@pytest.mark.kafka
def test_a_running_cluster_passes(kafka_settings) -> None:
    require_kafka(kafka_settings)  # raises if the probe mistook a live broker for an absent one
    multi = load_settings({}, home=kafka_settings.home,
                          bootstrap_servers=f"127.0.0.1:{closed_port()},{kafka_settings.kafka_bootstrap}")
    require_kafka(multi)  # one bootstrap server down of two is not "unreachable"
