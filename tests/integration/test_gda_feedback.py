"""GDA feedback: results become PIA datagrams on a real UDP socket."""

import socket

import pytest

from beamstream.connectors.gda_feedback import GdaFeedback, parse_address, pia_datagram
from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.topics import topic_name
from beamstream.schemas.examples import example_event
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import make_serde


def test_datagram_format():
    result = example_event("ImageResult")
    assert pia_datagram(result) == b"PIA:1001:1:120:110:2.10:123456"
    result["d_min_distl_method_1"] = None
    assert pia_datagram(result).split(b":")[5] == b"0.00"


@pytest.mark.parametrize("bad", ["gda", "gda:", ":9000", "gda:99999", "gda:port"])
def test_bad_address_is_named(bad):
    with pytest.raises(BeamstreamError, match="expected HOST:PORT"):
        parse_address(bad)


@pytest.mark.kafka
def test_results_are_sent_to_gda(kafka_settings):
    serde = make_serde()
    topic = topic_name(kafka_settings, "results")
    producer = make_producer(kafka_settings)
    for image in range(1, 6):
        result = example_event("ImageResult")
        result["image_number"] = image
        result["n_spots_no_ice"] = image * 10
        producer.produce(topic, serde.encode("ImageResult", result, topic), dcid_key(result["dcid"]))
    producer.flush(10)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gda:
        gda.bind(("127.0.0.1", 0))
        gda.settimeout(10)
        sent = GdaFeedback(kafka_settings, gda.getsockname(), from_beginning=True).run(
            max_messages=5, idle_timeout_s=20)
        received = sorted(gda.recv(1024) for _ in range(sent))
    assert sent == 5
    assert [d.split(b":")[2] for d in received] == [b"1", b"2", b"3", b"4", b"5"]
    assert [d.split(b":")[4] for d in received] == [b"10", b"20", b"30", b"40", b"50"]


@pytest.mark.kafka
def test_a_result_written_while_feedback_was_away_is_sent_after_it_rejoins(kafka_settings):
    # The service's group starts with new results only; a partition that had no result yet at the first start
    # must not start from "latest" again at the next start, or what came meanwhile is never sent.
    serde = make_serde()
    topic = topic_name(kafka_settings, "results")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gda:
        gda.bind(("127.0.0.1", 0))
        gda.settimeout(10)
        first = GdaFeedback(kafka_settings, gda.getsockname())
        assert first.run(idle_timeout_s=3) == 0  # joined, assigned every partition, nothing to send

        producer = make_producer(kafka_settings)
        result = example_event("ImageResult")
        result["image_number"] = 7
        producer.produce(topic, serde.encode("ImageResult", result, topic), dcid_key(result["dcid"]))
        producer.flush(10)

        sent = GdaFeedback(kafka_settings, gda.getsockname()).run(max_messages=1, idle_timeout_s=20)
        assert sent == 1
        assert gda.recv(1024).split(b":")[2] == b"7"
