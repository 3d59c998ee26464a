"""The dashboard as deployed, for browser tests: its own process, and screenshots kept as artifacts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers.harness import free_port_pair, service_env

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "e2e" / "artifacts"


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """Save a full-page screenshot in the test's tmp dir and a copy under tests/e2e/artifacts/."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path


class DashboardProcess:
    """``beamstream dashboard`` as its own process, as deployed: started outside the checkout (in the
    folder of its log), so nothing it imports can come from the repository's folders instead of the
    installed package.

    (Also because a dashboard served from a thread of this process, next to the in-process
    broker launcher, made Playwright's start crash the test process with SIGSEGV.)
    """

    def __init__(self, settings, log_path: Path, token: str) -> None:
        self.port = free_port_pair()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = service_env(settings, BEAMSTREAM_DASHBOARD_TOKEN=token)
        self.process = subprocess.Popen([sys.executable, "-m", "beamstream", "dashboard", "--port", str(self.port)],
                                        env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=log_path.parent)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "api/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        raise AssertionError(f"the dashboard did not start: {log_path.read_text()[-2000:]}")

    def stop(self) -> int | None:
        """SIGTERM, then its exit code (None if it had to be killed)."""
        self.process.terminate()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None
