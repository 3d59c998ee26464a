"""The local schema registry: Apicurio Registry's Confluent-compatible API on loopback.

Registry mode (``BEAMSTREAM_SCHEMA_REGISTRY_URL``) needs a Confluent-compatible
Schema Registry. Confluent's own is not on Maven Central, but Apicurio Registry
is, as a ready-built Quarkus application (the ``-all.tar.gz`` of its app
module). It is pinned with its checksum in ``registry-artifacts.json``,
downloaded once into the cache, unpacked next to it and run on the same
Java >= 17 as the local Kafka broker. Its storage is in memory: schemas live as
long as the process, and ids start again at 1 after a restart.

Clients talk to :attr:`LocalRegistry.url`, which ends in ``/apis/ccompat/v7``.
Logs and the pid file live under ``<home>/registry``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from beamstream.errors import BeamstreamError
from beamstream.operations.artifacts import Artifact, fetch_artifacts, load_lock
from beamstream.operations.cluster import find_java
from beamstream.platform.processes import PidFile, require_free_ports, tail_file
from beamstream.platform.settings import Settings

LOCK_FILE = Path(__file__).with_name("registry-artifacts.json")
CCOMPAT_PATH = "/apis/ccompat/v7"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
_COMPLETE_MARKER = ".beamstream-unpacked"


class RegistryError(BeamstreamError):
    """The local schema registry could not be installed, started, stopped or inspected."""


@dataclass(frozen=True)
class RegistryStatus:
    """What ``status()`` reports."""

    running: bool
    pid: int | None
    url: str
    log_file: Path
    registry_version: str
    storage: str

    def as_dict(self) -> dict:
        """The status as JSON-ready values."""
        return {
            "running": self.running,
            "pid": self.pid,
            "url": self.url,
            "log_file": str(self.log_file),
            "registry_version": self.registry_version,
            "storage": self.storage,
        }


class LocalRegistry:
    """Start, stop and inspect an Apicurio Registry on ``127.0.0.1:<local_registry_port>``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.home / "registry"
        self.log_dir = self.root / "logs"
        self.log_file = self.log_dir / "registry.log"
        self.tmp_dir = self.root / "tmp"
        self.pid_file = self.root / "registry.pid"
        self._pid_record = PidFile(self.pid_file, b"apicurio-registry-app")
        self.port = settings.local_registry_port
        self.repository, artifacts = load_lock(LOCK_FILE)
        self.artifact: Artifact = next(a for a in artifacts if a.artifact == "apicurio-registry-app")
        self.version = self.artifact.version
        self.install_dir = settings.cache_dir / "registry" / f"apicurio-registry-{self.version}"
        self._process: subprocess.Popen | None = None

    # -- state -------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the Confluent-compatible API, for ``RegistrySerde`` and ``schema_registry_url``."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    @property
    def runner_jar(self) -> Path:
        """The Quarkus runner jar inside the unpacked distribution."""
        return self.install_dir / f"apicurio-registry-app-{self.version}-runner.jar"

    def pid(self) -> int | None:
        """The registry's pid if it is running (a stale pid file is ignored)."""
        return self._pid_record.running_pid()

    def status(self) -> RegistryStatus:
        """Whether the registry runs, where, and which version."""
        pid = self.pid()
        return RegistryStatus(
            running=pid is not None,
            pid=pid,
            url=self.url,
            log_file=self.log_file,
            registry_version=self.version,
            storage="in-memory",
        )

    # -- commands ----------------------------------------------------------
    def up(self, progress: bool = True) -> RegistryStatus:
        """Start the registry (downloading and unpacking it on first use) and wait until it serves.

        Returns at once if it is already running and answering. Raises
        :class:`RegistryError` (or ``ArtifactError`` for a failed download) on failure.
        """
        if self.pid() is not None:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
            return self.status()
        require_free_ports((self.port,), "BEAMSTREAM_LOCAL_REGISTRY_PORT", RegistryError)
        java = find_java()
        self.install(progress=progress)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._start(java)
        try:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.down()  # leave no half-started registry behind
            raise
        return self.status()

    def down(self) -> bool:
        """Stop the registry (SIGTERM, then SIGKILL after a timeout). True if one was running."""
        was_running = self._pid_record.stop(STOP_TIMEOUT_S)
        self._process = None
        return was_running

    def install(self, progress: bool = True) -> Path:
        """Download (checksum-verified) and unpack the pinned distribution once; return the runner jar."""
        if self._unpacked_sha256() == self.artifact.sha256 and self.runner_jar.is_file():
            return self.runner_jar
        [archive] = fetch_artifacts([self.artifact], self.settings.cache_dir / "maven", self.repository,
                                    progress=progress)
        if self._unpacked_sha256() == self.artifact.sha256 and self.runner_jar.is_file():
            return self.runner_jar  # another process unpacked it meanwhile
        if self.install_dir.exists():  # unpacked from another archive, or damaged
            shutil.rmtree(self.install_dir, ignore_errors=True)
        self.install_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.install_dir.parent, prefix=".unpack-"))
        try:
            _unpack(archive, staging)
            if not (staging / self.runner_jar.name).is_file():
                raise RegistryError(f"{archive.name} has no {self.runner_jar.name}; is the lock file right?")
            (staging / _COMPLETE_MARKER).write_text(self.artifact.sha256 + "\n")
            try:
                staging.rename(self.install_dir)
            except OSError:  # another process unpacked it at the same time
                if self._unpacked_sha256() != self.artifact.sha256:
                    raise RegistryError(f"could not move the unpacked registry to {self.install_dir}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.runner_jar

    def tail_log(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the registry log."""
        return tail_file(self.log_file, lines)

    # -- internals ---------------------------------------------------------
    def _unpacked_sha256(self) -> str:
        """Checksum of the archive the install directory was unpacked from ("" if none)."""
        try:
            return (self.install_dir / _COMPLETE_MARKER).read_text().strip()
        except OSError:
            return ""

    def _command(self, java: str) -> list[str]:
        return [
            java,
            "-Xmx512m",
            "-Xms64m",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={self.tmp_dir}",
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self.port}",
            "-Dquarkus.http.access-log.enabled=false",
            # In-memory H2 storage is the distribution's default; said here so it stays so.
            "-Dapicurio.storage.kind=sql",
            "-Dapicurio.storage.sql.kind=h2",
            f"-Dapicurio.import.work-dir={self.tmp_dir}",
            f"-Dapicurio.storage.snapshot.location={self.tmp_dir}",
            "-jar",
            str(self.runner_jar),
        ]

    def _start(self, java: str) -> None:
        if self.log_file.is_file():
            self.log_file.replace(self.log_file.with_suffix(".log.1"))
        with open(self.log_file, "wb") as log:
            process = subprocess.Popen(
                self._command(java),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # survives the CLI that started it
            )
        self._pid_record.record(process.pid)
        self._process = process

    def _wait_ready(self, deadline: float) -> None:
        last_error = "no answer"
        while time.monotonic() < deadline:
            exited = self._process.poll() is not None if self._process is not None else self.pid() is None
            if exited:
                raise RegistryError(
                    f"the schema registry exited during start-up; last log lines:\n{self.tail_log(15)}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as response:
                    if response.status == 200 and isinstance(json.loads(response.read()), list):
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last_error = str(getattr(exc, "reason", None) or exc)
            time.sleep(0.25)
        raise RegistryError(
            f"the schema registry did not answer at {self.url} within {START_TIMEOUT_S:.0f} s ({last_error}); "
            f"see {self.log_file}"
        )


def _unpack(archive: Path, target: Path) -> None:
    """Unpack a tar.gz, refusing links, devices and paths that leave ``target``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise RegistryError(f"{archive.name}: refusing to unpack {member.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, members=members, filter="data")
            else:  # Python < 3.11.4; members were checked above
                tar.extractall(target, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise RegistryError(f"unpacking {archive} failed: {exc}") from None
