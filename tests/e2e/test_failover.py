"""Failover on three brokers: the node leading most of a grid scan's path (image, result and
transaction-state partitions) SIGKILLed mid-scan and left down; real workers, real brokers."""

from __future__ import annotations

import pytest

from tests.e2e.test_pipeline_eos import assert_exactly_once
from tests.helpers.failover import (  # noqa: F401 (the fixtures are used by name)
    scan_with_leader_killed,
    three_node_cluster,
    three_node_settings,
)
from tests.helpers.faults import fault_random, record_fault

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.mark.fault
def test_leader_killed_mid_scan_on_three_brokers(three_node_cluster, three_node_settings, tmp_path):  # noqa: F811
    settings, dcid = three_node_settings, 710001
    outcome = scan_with_leader_killed(settings, three_node_cluster, tmp_path, dcid,
                                      fault_random("three-broker leader kill"))
    try:
        record_fault("three-broker leader SIGKILL", images=outcome.images, lost=outcome.lost,
                     duplicated=outcome.duplicated, recovery_s=outcome.recovery_s, killed=outcome.led,
                     worker_restarts=len(outcome.restarts))
        assert three_node_cluster.status().nodes_running == 2, "the killed node must stay down"
        assert (outcome.lost, outcome.duplicated, outcome.summaries) == (0, 0, 1), (
            f"{outcome.led} killed: {outcome.lost} lost, {outcome.duplicated} duplicated, "
            f"{outcome.summaries} summaries")
        assert_exactly_once(outcome.reader, settings, dcid)  # also: complete summary, table = fold of results
        print(f"killed {outcome.led}; longest pause in results {outcome.recovery_s:.2f} s; "
              f"worker restarts {outcome.restarts}")
    finally:
        outcome.reader.close()
