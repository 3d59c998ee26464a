"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright) on the real pipeline.

A grid scan fills the page's heat map and its X-ray centre marker appears; a dead
letter (an image whose file was not there yet) is reinjected from the page with
the staff token once the file is written, and the collection completes; staff then
reprocess the grid scan from its page with parameters, and the new run fills in.
Screenshots go to the test's tmp dir and are copied to ``tests/e2e/artifacts/``.
"""

from __future__ import annotations

import bz2
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from beamstream.cli.commands.demo import register_collection
from beamstream.connectors.ispyb_schema import create_schema, make_engine
from beamstream.platform.settings import load_settings
from beamstream.producers.events import EventPublisher, collection_started, image_arrived
from tests.helpers.dashboard import CHROMIUM_ARGS, DashboardProcess, screenshot
from tests.helpers.harness import ServiceProcess, free_port_pair
from tests.helpers.metrics_helpers import scrape, value
from tests.helpers.programs import require_program

TOKEN = "tok-browser-test"
ROTATION_DCID = 880_001


def _thaumatin(data_dir: Path, number: int, target: Path) -> Path:
    target.write_bytes(bz2.decompress((data_dir / "thaumatin_grid" / f"thau_3_2_{number:04d}.cbf.bz2").read_bytes()))
    return target


@pytest.mark.kafka
@pytest.mark.slow
def test_heat_map_fills_and_a_dead_letter_is_reinjected_from_the_page(kafka_settings, data_dir, tmp_path):
    chromium = require_program("chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    from beamstream.producers.simulator import simulate_gridscan

    root = tmp_path / "data"
    root.mkdir()
    settings = load_settings(environ={}, bootstrap_servers=kafka_settings.kafka_bootstrap, home=tmp_path / "home",
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4, data_roots=(str(root),))
    metrics_port = free_port_pair()
    worker = ServiceProcess(settings, tmp_path, "w", "--analysis", "real", "--summary-timeout", "5",
                           "--retries", "2", "--retry-backoff", "0.1", "--metrics-port", str(metrics_port)).start()
    server = DashboardProcess(settings, tmp_path / "dashboard.log", f"browser-test:{TOKEN}")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url)
            page.wait_for_selector("#collection-rows")

            # -- a grid scan: the heat map fills in, then the X-ray centre is marked ---------------
            started = time.monotonic()
            # CBF: writing Eiger HDF5 (bitshuffle) in this process while the watcher reads it has crashed in
            # libh5bshuf; the workers read CBF as well, and the page is what this test is about.
            report = simulate_gridscan(settings, 3, 4, 10.0, detector="eiger2_1m", fmt="cbf", out_dir=root / "grid",
                                       seed=3)
            page.click(f"tr.collection[data-id='{report.dcid}']", timeout=60_000)
            try:
                page.wait_for_selector("#xray-centre", state="attached", timeout=120_000)
            except sync_api.TimeoutError:
                screenshot(page, tmp_path, "dashboard-gridscan-failed")
                detail = page.evaluate(f"fetch('/api/collections/{report.dcid}').then(r => r.text())")
                pytest.fail(f"no X-ray centre in the page; the API says {detail[:1500]}; worker log: "
                            f"{worker.log_text()[-2000:]}")
            print(f"scan start to X-ray centre in the page: {time.monotonic() - started:.1f} s")
            cells = page.locator("#heatmap-svg rect.cell")
            assert cells.count() == 12
            assert page.locator("#heatmap-svg rect.cell.empty").count() == 0
            counts = [int(c) for c in cells.evaluate_all("cells => cells.map(c => c.dataset.count)")]
            assert max(counts) > 0
            centre_row = float(page.get_attribute("#xray-centre", "data-row"))
            assert 0 <= centre_row <= 2
            assert "complete" in page.inner_text("#detail-title")
            # The pipeline panel: the scan's image events in the rates, the analysis group's lag measured.
            page.wait_for_selector("#lag-rows tr[data-group='analysis'][data-topic='images']", timeout=30_000)
            assert int(page.get_attribute("#rate-rows tr[data-topic='images']", "data-count")) >= 12
            shot = screenshot(page, tmp_path, "dashboard-gridscan")
            assert shot.stat().st_size > 10_000

            # -- a dead letter: image 2's file is not there yet ----------------------------------
            frames = [root / f"thau_{n:04d}.cbf" for n in (1, 2)]
            _thaumatin(data_dir, 1, frames[0])
            with EventPublisher(settings) as publisher:
                publisher.publish([collection_started(ROTATION_DCID, file_template=str(root / "thau_####.cbf"),
                                                      number_of_images=2, experiment_type="rotation",
                                                      beamline="i04", oscillation_start_deg=0.0,
                                                      oscillation_width_deg=0.1)])
                publisher.publish([image_arrived(ROTATION_DCID, n, str(p)) for n, p in enumerate(frames, start=1)])
            try:
                button = page.wait_for_selector("button.reinject", timeout=60_000)
            except sync_api.TimeoutError:
                screenshot(page, tmp_path, "dashboard-no-dead-letter")
                pytest.fail(f"no dead letter in the page after 60 s; worker log: {worker.log_text()[-3000:]}; "
                            f"dashboard log: {server.log_path.read_text()[-1500:]}")
            dead_id = button.get_attribute("data-id")
            page.click(f"tr.collection[data-id='{ROTATION_DCID}']", timeout=30_000)
            page.wait_for_selector("#rotation-plot[data-points='1']", timeout=30_000)
            screenshot(page, tmp_path, "dashboard-dead-letter")

            # -- the cause is fixed; staff reinject from the page, giving the token when asked ------
            _thaumatin(data_dir, 2, frames[1])
            prompts = []

            def give_token(dialog) -> None:
                prompts.append(dialog.message)
                dialog.accept(TOKEN)

            page.on("dialog", give_token)
            started = time.monotonic()
            page.click(f"button.reinject[data-id='{dead_id}']")
            page.wait_for_selector("#message.ok", timeout=60_000)
            assert f"reinjected {dead_id}" in page.inner_text("#message")
            page.wait_for_selector("#detail-summary[data-status='complete']", timeout=120_000)
            print(f"reinject click to summary in the page: {time.monotonic() - started:.1f} s")
            assert len(prompts) == 1 and "token" in prompts[0].lower()
            assert page.evaluate("sessionStorage.getItem('beamstreamStaffToken')") == TOKEN
            page.wait_for_selector(f"tr[data-id='{dead_id}'] td.resolved", timeout=30_000)
            # The resolution names the staff member whose token asked, not the dashboard's process user.
            assert "by browser-test" in page.inner_text(f"tr[data-id='{dead_id}'] td.resolved")
            assert page.locator(f"button.reinject[data-id='{dead_id}']").count() == 0
            assert page.get_attribute("#rotation-plot", "data-points") == "2"
            screenshot(page, tmp_path, "dashboard-reinjected")

            # -- Prometheus: the worker's own counters, the dashboard's view of the topics ------------
            worker_metrics = scrape(metrics_port)
            assert value(worker_metrics, "beamstream_worker_images_analysed_total") == 14
            assert value(worker_metrics, "beamstream_worker_result_latency_seconds_count") == 14
            assert value(worker_metrics, "beamstream_worker_dead_letters_total", error_type="ImageReadError") == 1
            assert value(worker_metrics, "beamstream_worker_summaries_total") == 2
            seen = scrape(server.port)
            assert value(seen, "beamstream_topic_events_total", record_type="ImageResult", topic="results") == 14

            # -- staff reprocess the grid scan from its page; the new run fills in as a collection of its own --
            engine = make_engine(settings.database_url)
            create_schema(engine)
            register_collection(engine, report)  # as the acquisition system would, and the demo does
            page.click(f"tr.collection[data-id='{report.dcid}']")
            page.wait_for_selector("#detail-title:has-text('grid')", timeout=30_000)
            page.fill("#reprocess-params", "d_min=2.0 backend=numpy")
            page.click("#reprocess")
            page.wait_for_selector("#message.ok:has-text('reprocessing')", timeout=60_000)
            job_id = int(page.inner_text("#message").split(" as job ")[1].split(":")[0])
            assert "(by browser-test)" in page.inner_text("#message")
            rerun = f"{report.dcid}/{job_id}"
            page.wait_for_selector(f"tr.collection[data-id='{rerun}'][data-state='complete']", timeout=120_000)
            page.wait_for_selector("#detail-summary[data-status='complete']", timeout=30_000)
            assert page.locator("#heatmap-svg rect.cell.empty").count() == 0
            assert page.locator("#xray-centre").count() == 1
            with engine.connect() as conn:
                [(recipe, comments, params)] = conn.execute(text(
                    "SELECT recipe, comments, group_concat(parameterKey || '=' || parameterValue) FROM ProcessingJob "
                    "JOIN ProcessingJobParameter USING (processingJobId) WHERE processingJobId = :j "
                    "GROUP BY processingJobId"), {"j": job_id}).all()
            assert recipe == "per-image-analysis" and "requested by browser-test" in comments
            assert sorted(params.split(",")) == ["backend=numpy", "d_min=2.0"]
            # A key=value mistake is named in the page, and nothing is sent.
            page.fill("#reprocess-params", "d_min")
            page.click("#reprocess")
            page.wait_for_selector("#message.error:has-text('is not key=value')", timeout=10_000)
            screenshot(page, tmp_path, "dashboard-reprocessed")
            browser.close()
    finally:
        assert server.stop() == 0, server.log_path.read_text()[-3000:]
        assert worker.terminate() == 0, worker.log_text()[-3000:]
