"""A real Prometheus (Debian's ``prometheus``) scrapes every service of a running pipeline and answers PromQL:
the images analysed, the p99 result latency, every target up, and every query of the Grafana dashboard.

The test runs its own ``prometheus`` binary with its own configuration, storage in tmp and a free port,
never a system service the package may have started."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from beamstream.connectors.ispyb_collections import create_collection
from beamstream.connectors.ispyb_schema import create_schema, make_engine
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.schemas.keys import dcid_key
from tests.helpers.harness import ServiceProcess, free_port_pair
from tests.helpers.ispyb_helpers import publish_raw
from tests.helpers.metrics_helpers import scrape
from tests.helpers.programs import require_program

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROWS, COLUMNS = 4, 6
N_IMAGES = ROWS * COLUMNS
GRID = {"rows": ROWS, "columns": COLUMNS, "step_x_um": 10.0, "step_y_um": 10.0,
        "origin_x_mm": 0.0, "origin_y_mm": 0.0, "snaked": True, "plane": "xy"}
DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "beamstream.json"


class Prometheus:
    """A private Prometheus server: ``prometheus`` with a config of ours, scraping every second."""

    def __init__(self, binary: str, tmp_path: Path, targets: dict[str, int]) -> None:
        self.port = free_port_pair()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                                     for job, port in targets.items()]}
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = tmp_path / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)

    def query(self, promql: str) -> list[dict]:
        """The instant vector (or scalar, as one sample) PromQL returns now; fails on a query Prometheus refuses."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 with a JSON body naming the error
            answer = json.load(exc)
        assert answer["status"] == "success", f"{promql}: {answer.get('error')}"
        data = answer["data"]
        return [{"metric": {}, "value": data["result"]}] if data["resultType"] == "scalar" else data["result"]

    def value(self, promql: str) -> float | None:
        """The single value of a query (None when it returns nothing)."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, condition, what: str, services: list[ServiceProcess],
                 timeout: float = 45.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            for service in services:
                if service.process.poll() is not None:
                    pytest.fail(f"{service.name} exited ({service.process.returncode}):\n{service.log_text()[-3000:]}")
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                result = self.query(promql)
            except OSError:  # not listening yet
                result = []
            if condition(result):
                return result
            time.sleep(0.5)
        pytest.fail(f"timed out waiting for {what}: {promql} = {result}\n{self.log.read_text()[-2000:]}")

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def _collection(settings, dcid: int, data: Path) -> None:
    template = str(data / "x_####.cbf")
    with EventPublisher(settings) as publisher:  # stamped now: the latency is this test's
        publisher.publish([collection_started(dcid, file_template=template, number_of_images=N_IMAGES,
                                              experiment_type="grid", grid=GRID)])
        publisher.publish([image_arrived(dcid, n, str(data / f"x_{n:04d}.cbf")) for n in range(1, N_IMAGES + 1)])
        publisher.publish([collection_ended(dcid, N_IMAGES)])


def _le_holding_all(port: int) -> float:
    """The smallest bucket bound of the worker's result-latency histogram that holds every observation."""
    samples = scrape(port)
    total = samples[("beamstream_worker_result_latency_seconds_count", frozenset())]
    bounds = sorted(float(dict(labels)["le"]) for name, labels in samples
                    if name == "beamstream_worker_result_latency_seconds_bucket")
    return next(b for b in bounds if samples[("beamstream_worker_result_latency_seconds_bucket",
                                              frozenset({("le", _le_text(b))}))] == total)


def _le_text(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else str(bound)


def test_prometheus_scrapes_the_pipeline_and_answers_promql(kafka_settings, tmp_path):
    binary = require_program("prometheus")  # before any service starts, so that none is left running
    settings = kafka_settings
    data = tmp_path / "data"
    data.mkdir()
    for n in range(1, N_IMAGES + 1):
        (data / f"x_{n:04d}.cbf").write_bytes(b"image %d" % n)
    url = f"sqlite:///{tmp_path / 'ispyb.sqlite'}"
    engine = make_engine(url)
    create_schema(engine)
    dcid = create_collection(engine, file_template=str(data / "x_####.cbf"), number_of_images=N_IMAGES,
                             experiment_type="grid", grid=GRID)
    ports = {job: free_port_pair() for job in ("worker", "ispyb-sink", "archiver", "feedback", "monitor")}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gda:
        gda.bind(("127.0.0.1", 0))

        def metrics(job: str) -> tuple[str, str]:
            return "--metrics-port", str(ports[job])

        services = [
            ServiceProcess(settings, tmp_path, "worker", "--analysis", "noop", "--summary-timeout", "30",
                           "--log-level", "warning", *metrics("worker")),
            ServiceProcess(settings, tmp_path, "ispyb-sink", "--batch-wait", "0.1", *metrics("ispyb-sink"),
                           command="ispyb-sink", env={"BEAMSTREAM_ISPYB_URL": url}),
            ServiceProcess(settings, tmp_path, "archiver", *metrics("archiver"), command="archiver",
                           env={"BEAMSTREAM_ARCHIVE_ROOT": str(tmp_path / "archive")}),
            ServiceProcess(settings, tmp_path, "feedback", "--udp", f"127.0.0.1:{gda.getsockname()[1]}",
                           "--from-beginning", *metrics("feedback"), command="feedback"),
            ServiceProcess(settings, tmp_path, "monitor", "--observe-only", "--interval", "1", *metrics("monitor"),
                           command="monitor"),
        ]
        for service in services:
            service.start()
        prometheus = Prometheus(binary, tmp_path, ports)
        try:
            prometheus.wait_for("up == 1", lambda r: {s["metric"]["job"] for s in r} == set(ports),
                                "every service scraped", services, timeout=60)
            prometheus.wait_for("beamstream_monitor_workers", lambda r: r and float(r[0]["value"][1]) == 1,
                                "the monitor seeing the worker", services)
            _collection(settings, dcid, data)
            publish_raw(settings, "images", [(dcid_key(dcid), b"not an image event")])  # one dead letter
            prometheus.wait_for("sum(beamstream_worker_images_analysed_total)",
                                lambda r: r and float(r[0]["value"][1]) >= N_IMAGES, "every image analysed", services)
            prometheus.wait_for('sum(beamstream_ispyb_sink_rows_written_total{kind="result"})'
                                " + sum(beamstream_archiver_collections_archived_total)",
                                lambda r: r and float(r[0]["value"][1]) == N_IMAGES + 1,
                                "the rows stored and the collection archived", services)
            # A labelled series (rows by kind, dead letters by type) starts at its first count: a rate over it
            # needs a second scrape to exist at all (and stays 0 until the next count: Prometheus 2 does not
            # take a new series to have started from 0).
            for rate in ('rate(beamstream_ispyb_sink_rows_written_total{kind="result"}[1m])',
                         "increase(beamstream_worker_dead_letters_total[1m])"):
                prometheus.wait_for(rate, bool, rate, services)
            dead_letters = prometheus.query("sum by (error_type) (beamstream_worker_dead_letters_total)")
            analysed = prometheus.value("sum(beamstream_worker_images_analysed_total)")
            p99 = prometheus.value("histogram_quantile(0.99, sum by (le) "
                                   "(rate(beamstream_worker_result_latency_seconds_bucket[1m])))")
            bound = _le_holding_all(ports["worker"])
            up = {s["metric"]["job"]: float(s["value"][1]) for s in prometheus.query("up")}
            archived = prometheus.value("sum(beamstream_archiver_collections_archived_total)")
            sent = prometheus.value("sum(beamstream_feedback_datagrams_sent_total)")
            # Every query of the Grafana dashboard, on the real server: PromQL it accepts, over series that exist.
            panels = json.loads(DASHBOARD.read_text())["panels"]
            answers = {(panel["title"], target["expr"]): prometheus.query(
                target["expr"].replace("$__rate_interval", "1m")) for panel in panels for target in panel["targets"]}
        finally:
            stopped = prometheus.stop()
            codes = {service.name: service.terminate() for service in services}
    assert codes == dict.fromkeys(codes, 0), {s.name: s.log_text()[-2000:] for s in services if codes[s.name]}
    assert stopped == 0, prometheus.log.read_text()[-2000:]
    assert analysed == N_IMAGES  # exactly once: no image counted twice
    assert p99 is not None and math.isfinite(p99) and 0 < p99 <= bound, (p99, bound)
    assert up == dict.fromkeys(ports, 1.0)
    assert archived == 1 and sent >= N_IMAGES
    assert [(s["metric"]["error_type"], s["value"][1]) for s in dead_letters] == [("CorruptMessageError", "1")]
    # The panels staff read first have data: images, latency, workers, lag, ISPyB rows, archives.
    empty = {title for title in {t for t, _ in answers} if not any(r for (t, _), r in answers.items() if t == title)}
    assert not {"Images analysed per second", "Result latency (image arrival to result)", "Workers", "Consumer lag",
                "Dead letters", "ISPyB rows written per second", "Collections archived (last hour)"} & empty, empty
