"""Small helpers for the background services the launchers run (Kafka, the registry)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


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


def tail_file(path: Path, lines: int = 50) -> str:
    """The last ``lines`` lines of a (log) file, reading at most its last 256 KiB."""
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 256 * 1024))
        text = handle.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
