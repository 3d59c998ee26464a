"""Without MariaDB's or Chromium's Debian package, only the tests that need them fail, each in one line.

A machine set up by ``scripts/dev-setup`` without root lacks those packages. This runs pytest in a
subprocess on a MariaDB test, the browser test and a plain Kafka test, with a PATH on which the server's
and the browser's programs do not exist (every other program of the machine is there, through symlinks).
The two fail with a one-line reason naming the package to install, neither skipped nor with a
traceback; the Kafka test passes in the same run, its session broker untouched by the failed fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
#: The programs hidden, of the packages mariadb-server (its mariadbd stays in /usr/sbin, which the tests
#: also search, but mariadb-install-db is on PATH) and chromium.
HIDDEN = {"mariadbd", "mariadb-install-db", "chromium"}
MARIADB_TEST = "tests/integration/test_ispyb_sink.py::test_refused_rows_raise_data_refused_on_mariadb"
BROWSER_TEST = "tests/e2e/test_dashboard_browser.py::test_heat_map_fills_and_a_dead_letter_is_reinjected_from_the_page"
PLAIN_TEST = "tests/integration/test_schemas.py::test_every_schema_round_trips_through_its_real_topic"


def path_without(hidden: set[str], directory: Path) -> str:
    """A one-directory PATH with a symlink to every program on PATH (first one wins) except ``hidden``."""
    directory.mkdir()
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = directory / entry.name
            if entry.name not in hidden and not link.exists() and not link.is_symlink():
                link.symlink_to(entry.path)
    return str(directory)


def test_only_the_tests_needing_a_missing_package_fail_each_in_one_line(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
         f"--junitxml={report}", MARIADB_TEST, BROWSER_TEST, PLAIN_TEST],
        cwd=ROOT, env={**os.environ, "PATH": path_without(HIDDEN, tmp_path / "bin")},
        capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "\nE   " not in output, output

    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        problems = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[name] = [(child.tag, (child.text or "").strip()) for child in problems]
    assert set(outcomes) == {test.rsplit("::", 1)[1] for test in (MARIADB_TEST, BROWSER_TEST, PLAIN_TEST)}, output
    assert outcomes[PLAIN_TEST.rsplit("::", 1)[1]] == [], output
    for test, package in ((MARIADB_TEST, "mariadb-server"), (BROWSER_TEST, "chromium")):
        [(kind, reason)] = outcomes[test.rsplit("::", 1)[1]]
        assert kind in ("failure", "error"), f"{test}: {kind} {reason}"  # never a skip
        assert "\n" not in reason and reason.endswith(
            f"is missing: sudo apt-get install {package} (scripts/dev-setup installs it when run as root)"), reason
