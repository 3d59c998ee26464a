"""What the fuzz run (tests/e2e/test_fuzz.py) found, one focused case each: every one of these stopped a
consumer, or held it in a loop of refused transactions, before it was fixed."""

from __future__ import annotations

import io
import json
import math
from datetime import UTC, datetime

import fastavro
import pytest

from beamstream.connectors import ispyb_mapping as mapping
from beamstream.connectors.manifests import ManifestError, build_manifest
from beamstream.dashboard.web import _json
from beamstream.engine.dead_letters import MAX_CARRIED_BYTES, dead_letter
from beamstream.platform.retained import header_count
from beamstream.platform.settings import path_within_roots
from beamstream.schemas.examples import example_event
from beamstream.schemas.serde import SINGLE_OBJECT_MAGIC, CorruptMessageError, SingleObjectSerde
from beamstream.streams import collection_state as cs
from tests.helpers.fake_kafka import FakeMessage

SERDE = SingleObjectSerde()


def _written_as(record_type: str, field: str, avro_type, value) -> bytes:
    """``record_type``'s example with ``field`` written as ``avro_type``, behind the real fingerprint."""
    version = SERDE.catalog.schema(record_type)
    schema = json.loads(json.dumps(version.schema))
    for spec in schema["fields"]:
        if spec["name"] == field:
            spec["type"] = avro_type
            spec.pop("default", None)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema, named_schemas={}),
                               {**example_event(record_type), field: value})
    return SINGLE_OBJECT_MAGIC + version.fingerprint + out.getvalue()


def test_a_timestamp_past_year_9999_is_a_corrupt_message():
    data = _written_as("ImageArrived", "arrival_time", "long", 2**62)
    with pytest.raises(CorruptMessageError, match="ImageArrived body cannot be decoded"):
        SERDE.decode(data, "images")


def test_an_int_field_wider_than_32_bits_is_a_corrupt_message():
    # fastavro reads it; the consumer's result could then never be written (the analysis stage stopped).
    data = _written_as("ImageArrived", "frame_index", "long", 2**40 + 7)
    with pytest.raises(CorruptMessageError, match="frame_index"):
        SERDE.decode(data, "images")


def test_paths_with_a_nul_byte_or_a_symlink_loop_are_outside_every_root(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert not path_within_roots(f"{tmp_path}/a\x00b.cbf", (str(tmp_path),))
    assert not path_within_roots(str(tmp_path / "loop" / "x.cbf"), (str(tmp_path),))
    assert path_within_roots(str(tmp_path / "x.cbf"), (str(tmp_path),))


@pytest.mark.parametrize("value", [b"99999999999999999999", b"2147483647", b"-3", b"abc", None])
def test_a_counter_header_out_of_the_records_range_counts_as_junk(value):
    assert header_count([("beamstream-reinjected", value)], "beamstream-reinjected") == 0


def test_a_dead_letter_of_a_message_near_the_record_limit_fits_the_dead_letter_topic():
    letter = dead_letter(reason="bad header", error_type="CorruptMessageError", service="s", source_topic="t",
                         source_partition=0, source_offset=1, key=b"k" * 10_000, payload=b"\xff" * 990_000,
                         headers=[("beamstream-reinjected", b"1" * 5000)] * 3)
    encoded = SERDE.encode("DeadLetter", letter)
    assert len(encoded) < 1_000_000
    assert len(letter["payload"]) + 10_000 <= MAX_CARRIED_BYTES
    assert "payload cut to its first" in letter["reason"] and "990000 bytes" in letter["reason"]


def test_a_long_reason_keeps_both_ends():
    letter = dead_letter(reason="x" * 500_000 + " is outside the configured data roots", error_type="e", service="s",
                         source_topic="t", source_partition=0, source_offset=1, key=None, payload=b"")
    assert len(letter["reason"]) < 3000 and letter["reason"].endswith("is outside the configured data roots")


def _started(**fields) -> dict:
    return {**example_event("CollectionStarted"), **fields}


@pytest.mark.parametrize("record_type, value, words", [
    ("ImageResult", {**example_event("ImageResult"), "image_number": -1}, "outside 0.."),
    ("ImageResult", {**example_event("ImageResult"), "image_number": 2**31 - 1}, "outside 0.."),
    ("CollectionStarted", _started(number_of_images=2**24 + 3), "image numbers must lie within"),
    ("CollectionStarted", _started(start_image_number=-5), "image numbers must lie within"),
    ("CollectionStarted", _started(grid={**_started()["grid"], "rows": 0}), "1 to 40000 positions"),
    ("CollectionStarted", _started(grid={**_started()["grid"], "plane": "x" * 100_000}), "xy or xz expected"),
])
def test_events_no_collection_table_can_hold_are_refused(record_type, value, words):
    # Before: a negative image number raised IndexError in the bitmap; a huge one grew the table entry past
    # Kafka's record limit (its changelog record was refused on every retry); a grid of 0 rows failed the summary.
    problem = cs.event_problem(record_type, value)
    assert problem is not None and words in problem


def test_valid_events_have_no_problem():
    for record_type in ("ImageResult", "CollectionStarted", "CollectionEnded", "CollectionCheck"):
        assert cs.event_problem(record_type, example_event(record_type)) is None


def test_a_resolution_near_the_largest_double_lands_in_the_last_bin():
    state = cs.CollectionState(1)
    assert cs.apply_result(state, {**example_event("ImageResult"), "estimated_d_min": 1e308})
    assert state.d_min_histogram == {cs.D_MIN_BINS - 1: 1}


def test_a_manifest_of_billions_of_images_is_refused_at_once(tmp_path):
    started = {"dcid": 1, "file_template": str(tmp_path / "x_####.cbf"), "number_of_images": 2**31 - 1}
    with pytest.raises(ManifestError, match="more than a manifest lists"):
        build_manifest(started, {"images_collected": 2**31 - 1})


@pytest.mark.parametrize("field, bad, words", [
    ("dcid", 2**53 + 1, "dcid must be from 1"), ("processing_job_id", 2**31, "processing_job_id must be from 1"),
    ("image_number", 2**24 + 3, "end at 8388607"),
])
def test_ids_past_ispybs_columns_are_refused_before_the_database(field, bad, words):
    # Before: the database refused each, after two retries and a bisection of its batch: 0.6 s a message.
    with pytest.raises(mapping.RecordError, match=words):
        mapping.check_result({**example_event("ImageResult"), field: bad})


def test_a_resolution_past_a_float_column_is_stored_as_null():
    row = mapping.quality_indicators({**example_event("ImageResult"), "d_min_distl_method_1": 1e308})
    assert row["method1Res"] is None


def test_the_dashboard_answers_strict_json():
    body = _json({"rate": math.nan, "rows": [{"d_min": math.inf}, 1.5], "at": datetime(2026, 1, 1, tzinfo=UTC)}).text
    assert json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} in {body}")) == {
        "rate": None, "rows": [{"d_min": None}, 1.5], "at": "2026-01-01 00:00:00+00:00"}


def _dead_letter_of(output) -> dict:
    topic, _key, value = output
    assert topic.endswith("deadletter")
    return SERDE.decode(value, topic, "DeadLetter").value


@pytest.fixture
def collect():
    from beamstream.platform.settings import load_settings
    from beamstream.streams.collect_stage import CollectProcessor

    return CollectProcessor(load_settings(environ={}), SERDE)


def test_the_collect_stage_dead_letters_a_record_without_a_dcid(collect):
    # Before: KeyError 'dcid' stopped the stage (the type was checked after the dcid was read).
    beat = SERDE.encode("ServiceHeartbeat", example_event("ServiceHeartbeat"))
    [output] = collect.process([FakeMessage(collect.topics["results"], 0, 7, b"1", beat)])
    letter = _dead_letter_of(output)
    assert letter["reason"] == "unexpected ServiceHeartbeat on beamstream.results" and letter["source_offset"] == 7


@pytest.mark.parametrize("key", [None, b"", b"78"])
def test_the_collect_stage_dead_letters_a_sample_summary_not_keyed_by_its_sample(collect, key):
    # Before: the samples table took it under its key; a null key made a changelog record the compacted
    # topic refuses, so every transaction of the stage was aborted from then on.
    summary = SERDE.encode("CollectionSummary", example_event("CollectionSummary"))  # sample 77
    [output] = collect.process([FakeMessage(collect.topics["samples"], 0, 3, key, summary)])
    assert "is not keyed by its sample id (77)" in _dead_letter_of(output)["reason"]
    assert not collect.samples.flush()


def test_the_ispyb_sink_dead_letters_what_does_not_belong_on_the_summaries_topic():
    from sqlalchemy import create_engine

    from beamstream.connectors.ispyb_sink import SinkOptions, SinkProcessor
    from beamstream.platform.settings import load_settings

    sink = SinkProcessor(load_settings(environ={}), create_engine("sqlite://"), SinkOptions())
    image = SERDE.encode("ImageArrived", example_event("ImageArrived"))
    centre = SERDE.encode("SampleCentre", example_event("SampleCentre"))
    items, poison = sink._decode([FakeMessage(sink.summaries_topic, 0, 1, b"1", image),
                                  FakeMessage(sink.summaries_topic, 0, 2, b"1", centre)])
    assert items == [] and sink.stats.skipped == 1  # a SampleCentre is not ISPyB's business
    assert [p.reason for p in poison] == ["message on beamstream.summaries is of type ImageArrived, expected "
                                          "CollectionSummary or SampleCentre"]
