"""The dashboard as deployed, for browser tests: its own process, and screenshots kept as artifacts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from beamstream.producers.events import EventPublisher, collection_started, image_arrived
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
        self.stop()  # not left running for the rest of the session
        raise AssertionError(f"the dashboard did not start: {log_path.read_text()[-2000:]}")

    def stop(self) -> int | None:
        """SIGTERM, then its exit code (None if it had to be killed)."""
        self.process.terminate()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None


def publish_two_collections(settings) -> float:
    """Collection 101's six images in one transaction, then collection 202's four in a later one (CBF paths
    under /d); returns an epoch time between the two, for browsing by time."""
    with EventPublisher(settings) as publisher:
        publisher.publish([collection_started(101, file_template="/d/a_####.cbf", number_of_images=6)])
        publisher.publish([image_arrived(101, n, f"/d/a_{n:04d}.cbf") for n in range(1, 7)])
        time.sleep(0.05)  # the second batch's records get later timestamps than the first's
        between = time.time()
        time.sleep(0.05)
        publisher.publish([image_arrived(202, n, f"/d/b_{n:04d}.cbf") for n in range(1, 5)])
    return between
