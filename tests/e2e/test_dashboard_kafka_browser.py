"""The dashboard's Kafka tab in a real browser (Debian's chromium through Playwright) on the session broker.

Staff open a topic (partitions, configs), browse its messages by offset, page on, browse by time, filter by
dcid, get a one-line refusal for a bad offset and a bad time, and open a consumer group with a member and a
known lag on each partition. Every request the page makes is a GET. Screenshots go to ``tests/e2e/artifacts/``.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from confluent_kafka import TopicPartition

from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.topics import topic_name
from tests.helpers.dashboard import CHROMIUM_ARGS, DashboardProcess, publish_two_collections, screenshot
from tests.helpers.programs import require_program

#: Records written to each partition of ``results`` and where the group commits: lags 3, 0, 0, 2.
WRITTEN = {0: 5, 1: 3, 2: 0, 3: 2}
COMMITTED = {0: 2, 1: 3}


def _group_with_lag(settings):
    """A member of group ``kv-readers`` on ``results`` with the offsets of :data:`COMMITTED` committed."""
    results = topic_name(settings, "results")
    producer = make_producer(settings)
    for partition, count in WRITTEN.items():
        for n in range(count):
            producer.produce(results, b"r", f"{partition}:{n}".encode(), partition=partition)
    producer.flush(10)
    consumer = make_consumer(settings, f"{settings.topic_prefix}kv-readers", **{"client.id": "kv-reader-1"})
    consumer.subscribe([results])
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        assert time.monotonic() < deadline, "no partitions assigned"
        consumer.poll(0.2)
    consumer.commit(offsets=[TopicPartition(results, p, o) for p, o in COMMITTED.items()], asynchronous=False)
    return consumer


def _rows(page, selector: str, *attributes: str) -> list[tuple]:
    return [tuple(row) for row in page.locator(selector).evaluate_all(
        f"rows => rows.map(r => {list(attributes)}.map(a => r.getAttribute(a)))")]


@pytest.mark.kafka
def test_staff_browse_topics_messages_and_groups_read_only(kafka_settings, tmp_path):
    chromium = require_program("chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    settings = kafka_settings
    images, group = topic_name(settings, "images"), f"{settings.topic_prefix}kv-readers"
    between = publish_two_collections(settings)
    member = _group_with_lag(settings)
    server = DashboardProcess(settings, tmp_path / "dashboard.log", "staff:unused-token")
    methods = []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1200})
            page.on("request", lambda request: methods.append((request.method, request.url)))
            page.goto(server.url)
            page.click("#tab-kafka")

            # -- a topic: partitions and configs, defaults hidden until asked for --------------------------
            page.click(f"#kafka-topic-rows tr[data-topic='{images}']", timeout=30_000)
            page.wait_for_selector(f"#kafka-topic[data-topic='{images}']")
            assert page.locator("#kafka-partition-rows tr").count() == 4
            assert page.locator("#kafka-config-rows tr.nondefault[data-config='retention.ms']").count() == 1
            assert page.locator("#kafka-config-rows tr.default").count() == 0
            page.check("#kafka-show-defaults")
            assert page.locator("#kafka-config-rows tr.default").count() > 10

            # -- messages by offset, then the next page ---------------------------------------------------
            assert page.input_value("#kb-topic") == images  # chosen by the click on the topic
            page.fill("#kb-limit", "100")
            page.click("#kb-browse")
            page.wait_for_selector("#kb-summary[data-stopped='end']")
            everything = _rows(page, "#kb-rows tr.message", "data-partition", "data-type")
            assert len(everything) == 10 and {t for _, t in everything} == {"ImageArrived"}
            busiest = Counter(p for p, _ in everything).most_common(1)[0][0]  # 10 images on 4 partitions: >= 3
            page.select_option("#kb-partition", busiest)
            page.select_option("#kb-from", "offset")
            page.fill("#kb-offset", "0")
            page.fill("#kb-limit", "2")
            page.click("#kb-browse")
            page.wait_for_selector("#kb-summary[data-stopped='limit']")
            first = _rows(page, "#kb-rows tr.message", "data-partition", "data-offset")
            assert [p for p, _ in first] == [busiest] * 2 and first[0][1] == "0"
            assert "ImageArrived" in page.inner_text("#kb-rows tr.message >> nth=0")
            page.click("#kb-next")
            page.wait_for_function(
                f"Number(document.querySelector('#kb-rows tr.message').dataset.offset) > {first[1][1]}")
            assert int(page.get_attribute("#kb-rows tr.message >> nth=0", "data-offset")) > int(first[1][1])
            screenshot(page, tmp_path, "dashboard-kafka-messages")

            # -- by time, typed as the browser's local time -------------------------------------------------
            local = page.evaluate("""ms => { const d = new Date(ms), two = (n) => String(n).padStart(2, '0');
                return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())}T${two(d.getHours())}:` +
                       `${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, '0')}`;
                }""", int(between * 1000))
            page.select_option("#kb-partition", "")
            page.select_option("#kb-from", "time")
            page.fill("#kb-time", local)
            page.fill("#kb-limit", "100")
            page.click("#kb-browse")
            page.wait_for_selector("#kb-summary[data-start='time']")
            assert [d for (d,) in _rows(page, "#kb-rows tr.message", "data-dcid")] == ["202"] * 4

            # -- filtered by dcid, scanning forward within a bound ------------------------------------------
            page.select_option("#kb-from", "earliest")
            page.fill("#kb-dcid", "101")
            page.click("#kb-browse")
            page.wait_for_selector("#kb-summary:has-text('with dcid 101')")
            assert [d for (d,) in _rows(page, "#kb-rows tr.message", "data-dcid")] == ["101"] * 6
            assert page.get_attribute("#kb-summary", "data-scanned") == "10"
            page.fill("#kb-scan", "3")
            page.click("#kb-browse")
            page.wait_for_selector("#kb-summary[data-stopped='scan'][data-scanned='3']")

            # -- mistakes: a one-line reason on the page --------------------------------------------------
            page.select_option("#kb-partition", "0")
            page.select_option("#kb-from", "offset")
            page.fill("#kb-offset", "abc")
            page.click("#kb-browse")
            page.wait_for_selector("#kafka-message.error:has-text('offset is a whole number')")
            page.select_option("#kb-from", "time")
            page.fill("#kb-time", "yesterday")
            page.click("#kb-browse")
            page.wait_for_selector("#kafka-message.error:has-text('time is ISO 8601')")
            assert page.inner_text("#kafka-message").startswith("400: ")

            # -- a consumer group: its member and the lag of each partition -------------------------------
            page.click(f"#kafka-group-rows tr[data-group='{group}']")
            page.wait_for_selector(f"#kafka-group[data-group='{group}'][data-lag='5']")
            assert _rows(page, "#kafka-member-rows tr", "data-client") == [("kv-reader-1",)]
            lags = _rows(page, "#kafka-lag-rows tr", "data-partition", "data-committed", "data-lag")
            assert lags == [("0", "2", "3"), ("1", "3", "0"), ("2", "", "0"), ("3", "", "2")]
            screenshot(page, tmp_path, "dashboard-kafka-group")

            # -- back to the overview, which the tab hid --------------------------------------------------
            assert not page.is_visible("#collections")
            page.click("#tab-overview")
            page.wait_for_selector("#collections", state="visible")
            assert not page.is_visible("#kafka-topics")
            browser.close()
    finally:
        member.close()
        assert server.stop() == 0, server.log_path.read_text()[-3000:]
    kafka_calls = [(method, url) for method, url in methods if "/api/kafka/" in url]
    assert len(kafka_calls) >= 12 and {method for method, _ in kafka_calls} == {"GET"}
