"""A worker analysing several images at once (``--threads``) loses partitions while images are in flight.

Worker A analyses with 8 threads and 3 s per image (sleeping); 16 images of a collection are in
its hands when worker B joins. The rebalance takes A's partitions away mid-analysis: A finishes
analysing the images it had started, but the results of those whose partitions went to B are
never committed by A; B analyses them again, and every image has exactly one result.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from tests.helpers.harness import ServiceProcess, TopicReader

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DCID, N_IMAGES = 4242, 16
ARGS = ("--analysis", "noop", "--simulated-analysis-time", "3", "--threads", "8", "--summary-timeout", "30",
        "--log-level", "info")


def analysed_by(worker: ServiceProcess) -> set[int]:
    """Image numbers a worker's log says it finished analysing (committed or not)."""
    numbers = set()
    for line in worker.log_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("message") == "image analysed" and entry.get("dcid") == DCID:
                numbers.add(entry["image"])
    return numbers


def test_a_partition_revoked_mid_analysis_gets_its_result_from_the_new_owner_only(kafka_settings, tmp_path):
    settings = kafka_settings
    reader = TopicReader(settings, ["results", "summaries"])
    first = ServiceProcess(settings, tmp_path, "a", *ARGS).start()
    second = ServiceProcess(settings, tmp_path, "b", *ARGS)
    try:
        with EventPublisher(settings) as publisher:
            publisher.publish([collection_started(DCID, file_template="/data/t_######.cbf", number_of_images=N_IMAGES,
                                                  experiment_type="rotation")])
            publisher.publish([image_arrived(DCID, n, f"/data/t_{n:06d}.cbf") for n in range(1, N_IMAGES + 1)])
            publisher.publish([collection_ended(DCID, N_IMAGES)])
        deadline = time.monotonic() + 60
        while "table partitions restored" not in first.log_text():  # A's collect stage has joined
            assert time.monotonic() < deadline, first.log_text()[-2000:]
            time.sleep(0.2)
        time.sleep(1.0)  # A's analysis stage has taken the images in; each takes 3 s
        second.start()

        reader.wait_for(lambda: len(reader.values("results", dcid=DCID)) >= N_IMAGES
                        and reader.values("summaries", dcid=DCID), 120, "every result and the summary")
        time.sleep(3)  # anything late would be a duplicate
        results = reader.values("results", dcid=DCID)
        counts = Counter(r["image_number"] for r in results)
        assert sorted(counts) == list(range(1, N_IMAGES + 1)) and set(counts.values()) == {1}, counts
        [summary] = reader.values("summaries", dcid=DCID)
        assert summary["status"] == "complete" and summary["images_analysed"] == N_IMAGES

        by_worker = {r["image_number"]: r["worker_id"].rsplit(":", 1)[1] for r in results}
        b_pid = str(second.process.pid)
        taken_over = {n for n in analysed_by(first) if by_worker[n] == b_pid}
        # Images A analysed whose committed result is B's: A's results for them were dropped.
        assert taken_over, f"no image analysed by A was answered by B: {by_worker}"
        assert set(by_worker.values()) == {str(first.process.pid), b_pid}
    finally:
        for worker in (first, second):
            worker.terminate()
        reader.close()
