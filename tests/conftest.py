"""Shared fixtures: a real Kafka broker for the session, isolated topics per test.

The broker is the project's own launcher (single-node KRaft on loopback) in a
temporary home on free ports. Set BEAMSTREAM_TEST_BOOTSTRAP to run the tests
against an existing cluster instead, or BEAMSTREAM_TEST_KAFKA=testcontainers to
use a Kafka container where a Docker engine exists.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from beamstream.operations.cluster import LocalCluster
from beamstream.platform.processes import alive
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import apply_topics
from tests.helpers.harness import free_port_pair
from tests.helpers.programs import require_program

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real-data folder (never copied into the project)."""
    if not DATA_DIR.is_dir():
        pytest.fail(f"shared data folder {DATA_DIR} is missing")
    return DATA_DIR


#: Written into a session broker's home: the pid of the pytest process that owns the broker.
OWNER_FILE = "pytest-owner.pid"


def _stop_orphaned_brokers(pytest_root: Path) -> None:
    """Stop brokers left by pytest sessions that were killed (their fixture teardown never ran).

    Each would otherwise hold a gigabyte of heap and two ports until the machine restarts.
    """
    for owner_file in pytest_root.glob(f"pytest-*/home*/{OWNER_FILE}"):
        try:
            owner = int(owner_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if alive(owner):
            continue  # another session still running: its broker is in use
        home = owner_file.parent
        LocalCluster(load_settings(environ={}, home=home)).down()
        owner_file.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory) -> Iterator[tuple[Settings, LocalCluster | None]]:
    """A running broker for the whole session: (base settings, launcher or None if external)."""
    external = os.environ.get("BEAMSTREAM_TEST_BOOTSTRAP")
    if external:
        yield load_settings(bootstrap_servers=external, home=tmp_path_factory.mktemp("home")), None
        return
    if os.environ.get("BEAMSTREAM_TEST_KAFKA") == "testcontainers":
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield load_settings(bootstrap_servers=container.get_bootstrap_server(),
                                home=tmp_path_factory.mktemp("home")), None
        return
    _stop_orphaned_brokers(tmp_path_factory.getbasetemp().parent)
    home = tmp_path_factory.mktemp("home")
    (home / OWNER_FILE).write_text(str(os.getpid()))
    settings = load_settings(home=home, local_kafka_port=free_port_pair())
    cluster = LocalCluster(settings)
    cluster.up(progress=False)
    try:
        yield settings, cluster
    finally:
        cluster.down()


@pytest.fixture
def kafka_settings(kafka_cluster) -> Settings:
    """Settings pointing at the session broker, with a topic prefix of this test's own, topics applied."""
    base, _ = kafka_cluster
    settings = load_settings(
        bootstrap_servers=base.kafka_bootstrap,
        home=base.home,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        image_partitions=4,
    )
    apply_topics(settings)
    return settings


# -- MariaDB (the real ISPyB database) -----------------------------------------------
class MariaDB:
    """The session's private MariaDB server (``scripts/mariadb``): its URL, and stop/start for outage tests."""

    script = Path(__file__).resolve().parents[1] / "scripts" / "mariadb"

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.url = f"mysql+pymysql://beamstream:beamstream@127.0.0.1:{port}/ispyb"

    def _run(self, action: str) -> None:
        import subprocess

        done = subprocess.run([str(self.script), action, "--dir", str(self.directory), "--port", str(self.port)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            # CI installs MariaDB: a server that cannot start is a failure, never a skip.
            pytest.fail(f"scripts/mariadb {action} failed ({done.returncode}): {done.stderr.strip()[-2000:]}",
                        pytrace=False)

    def start(self) -> None:
        """Start (or restart) the server; returns once it answers."""
        self._run("start")

    def stop(self) -> None:
        """Shut the server down cleanly."""
        self._run("stop")


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory) -> Iterator[MariaDB]:
    """A MariaDB server for the whole session on a free loopback port, data in a temporary directory."""
    # Checked before the script, which as root would apt-get the server mid-run: packages are dev-setup's job.
    for program in ("mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin"):
        require_program(program)
    server = MariaDB(tmp_path_factory.mktemp("mariadb"), free_port_pair())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mariadb_url(mariadb) -> str:
    """SQLAlchemy URL of the session's MariaDB database ``ispyb`` (user beamstream)."""
    return mariadb.url
