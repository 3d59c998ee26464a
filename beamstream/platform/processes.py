"""Process handling: liveness, stopping, ports, log tails, and `beamstream` service processes (the demo's
and the process monitor's workers, the launchers' Kafka and registry)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from beamstream.platform.settings import Settings


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, or a reaped child of ours, counts as gone)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        return state != "Z"
    except OSError:
        return True


def stop_process(pid: int, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout_s``; returns once it is gone."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    kill_process(pid)


def kill_process(pid: int) -> None:
    """SIGKILL (no clean shutdown); returns once it is gone."""
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.05)


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` of 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def require_free_ports(ports: Iterable[int], setting: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the first of ``ports`` taken on 127.0.0.1 and ``setting``, where to choose another."""
    for port in ports:
        if not port_is_free(port):
            raise error(f"port {port} on 127.0.0.1 is taken by another process; choose another with {setting}")


class PidFile:
    """The pid file of a background process this user started and left running (the local Kafka broker,
    the schema registry): one rule, for every launcher, for whether the process it names still runs."""

    def __init__(self, path: Path, marker: bytes) -> None:
        self.path = path
        #: Part of the process's command line (``b"kafka.Kafka"``): tells ours from a reused pid.
        self.marker = marker

    def running_pid(self) -> int | None:
        """The recorded pid while that process runs and is ours; None for a missing, garbled or stale file."""
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 0:  # os.kill() would take 0 as our own process group and -1 as every process we may signal
            return None
        try:
            if not alive(pid):
                return None
        except PermissionError:
            # The pid runs but belongs to another user, so it is not the process we started (the launcher
            # runs it as us, from a pid file under our own home): the pid was reused after a reboot or a
            # crash. Calling the file stale lets `up` start again, and its port check still refuses if
            # something really listens there; calling it running would leave `up` waiting for a server
            # that never answers, `down` failing to signal it and `reset` refusing, until the file is
            # deleted by hand.
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid  # no /proc to ask (macOS): a live pid of ours is the best evidence there is
        # Empty while the process is still inside execve() right after Popen: not yet recognisable, but
        # alive (zombies were ruled out above). Any other command line means the pid was reused.
        return pid if not cmdline or self.marker in cmdline else None

    def record(self, pid: int) -> None:
        """Remember ``pid`` as the running process."""
        self.path.write_text(str(pid))

    def stop(self, timeout_s: float) -> bool:
        """SIGTERM the recorded process (SIGKILL after ``timeout_s``) and forget it; True if it was running."""
        pid = self.running_pid()
        if pid is not None:
            stop_process(pid, timeout_s)
        self.path.unlink(missing_ok=True)
        return pid is not None

    def kill(self) -> bool:
        """SIGKILL the recorded process (no clean shutdown) and forget it; True if it was running."""
        pid = self.running_pid()
        if pid is not None:
            kill_process(pid)
        self.path.unlink(missing_ok=True)
        return pid is not None


def tail_file(path: Path, lines: int = 50) -> str:
    """The last ``lines`` lines of a (log) file, reading at most its last 256 KiB."""
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 256 * 1024))
        text = handle.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that points a `beamstream` process at ``settings``' broker, topics and home."""
    env = {**os.environ,
           "BEAMSTREAM_BOOTSTRAP_SERVERS": settings.kafka_bootstrap,
           "BEAMSTREAM_TOPIC_PREFIX": settings.topic_prefix,
           "BEAMSTREAM_IMAGE_PARTITIONS": str(settings.image_partitions),
           "BEAMSTREAM_HOME": str(settings.home),
           "PYTHONUNBUFFERED": "1"}
    if settings.data_roots:
        env["BEAMSTREAM_DATA_ROOTS"] = os.pathsep.join(settings.data_roots)
    env.update(extra)
    return env


class ServiceProcess:
    """One long-running `beamstream` service process (a worker by default) with its log in a file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str, *args: str, command: str = "worker",
                 env: dict[str, str] | None = None) -> None:
        self.settings, self.log_dir, self.name, self.args = settings, log_dir, name, args
        self.command = command
        self.env = env or {}  # added to service_env's, e.g. BEAMSTREAM_LOG_TOPIC
        self.retired = False  # stopped on purpose: a Supervisor leaves it down
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> ServiceProcess:
        self.starts += 1
        with open(self.log_dir / f"{self.name}-{self.starts}.log", "wb") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [sys.executable, "-m", "beamstream", self.command, *self.args],
                env=service_env(self.settings, **self.env), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final commit."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait for the clean shutdown; returns the exit code."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return None
        return self.process.returncode if self.process else None

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob(f"{self.name}-*.log")))
