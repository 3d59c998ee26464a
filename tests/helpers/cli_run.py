"""Run the `beamstream` command line as a person (or a script without a terminal) would, against test settings."""

from __future__ import annotations

import subprocess
import sys

from beamstream.platform.settings import Settings
from tests.helpers.harness import service_env


def run_cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``beamstream ARGS`` with the test's broker, topics and home; stdin is not a terminal."""
    return subprocess.run([sys.executable, "-m", "beamstream", *args], env=service_env(settings), text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]
