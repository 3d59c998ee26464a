"""The file watcher: what is readable (no Kafka), and what it publishes to a real broker."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from beamstream.diffraction.synthetic import SyntheticSpec, generate_frames, generate_image
from beamstream.diffraction.writers import nexus_file_names, write_cbf, write_nexus
from beamstream.producers.events import EventPublisher
from beamstream.producers.scanning import (
    CbfScanner,
    FrameRef,
    NexusScanner,
    TemplateError,
    cbf_file_name,
    format_ranges,
    make_scanner,
)
from beamstream.producers.watcher import watch
from tests.helpers.harness import TopicReader

SMALL = SyntheticSpec(detector="eiger2_1m")


@pytest.fixture(scope="module")
def image():
    return generate_image(SMALL, seed=1, strength=0.5)


@pytest.fixture(scope="module")
def cbf_bytes(image, tmp_path_factory) -> bytes:
    return write_cbf(image, tmp_path_factory.mktemp("cbf") / "one.cbf").read_bytes()


# --- templates -------------------------------------------------------------------------------


def test_template_names_and_errors(tmp_path):
    assert cbf_file_name("/d/thau_1_####.cbf", 7) == Path("/d/thau_1_0007.cbf")
    assert cbf_file_name("/d/x_##.cbf", 123) == Path("/d/x_123.cbf")  # wider numbers are written in full
    assert isinstance(make_scanner(tmp_path / "s_master.h5", 3), NexusScanner)
    for bad in ("/d/thau.cbf", "/d/a#b#.cbf", "/d/run#/x_###.cbf"):
        with pytest.raises(TemplateError):
            make_scanner(bad, 3)
    with pytest.raises(TemplateError, match="at least 1"):
        make_scanner(tmp_path / "x_####.cbf", 0)
    assert format_ranges([9, 1, 2, 3, 7, 10]) == "1-3, 7, 9-10"


# --- CBF scanning ----------------------------------------------------------------------------


def test_cbf_files_are_found_once_complete_in_image_order(tmp_path, image, cbf_bytes):
    template = tmp_path / "run" / "thau_1_####.cbf"
    scanner = CbfScanner(template, images=4, start=1)
    assert scanner.scan() == []  # the folder does not even exist yet
    template.parent.mkdir()

    write_cbf(image, cbf_file_name(template, 2))
    assert scanner.scan() == [FrameRef(2, str(cbf_file_name(template, 2)), 0)]
    assert scanner.scan() == []  # never twice

    # A file being written in place: the header is there, the binary section is not complete.
    third = cbf_file_name(template, 3)
    third.write_bytes(cbf_bytes[: len(cbf_bytes) // 2])
    write_cbf(image, cbf_file_name(template, 1))
    (template.parent / "unrelated_0004.cbf").write_bytes(cbf_bytes)
    assert [ref.image_number for ref in scanner.scan()] == [1]
    assert scanner.scan() == []  # a half-written file stays pending however often it is polled

    with third.open("ab") as handle:
        handle.write(cbf_bytes[len(cbf_bytes) // 2 :])
    write_cbf(image, cbf_file_name(template, 4))
    assert [ref.image_number for ref in scanner.scan()] == [3, 4]
    assert scanner.pending == []


def test_compressed_cbf_counts_once_its_size_is_stable(tmp_path, image):
    template = tmp_path / "x_####.cbf.gz"
    scanner = CbfScanner(template, images=1)
    write_cbf(image, cbf_file_name(template, 1))
    assert scanner.scan() == []  # size seen once: the writer might still be at it
    assert [ref.image_number for ref in scanner.scan()] == [1]


def test_start_image_number_offsets_the_files(tmp_path, image):
    template = tmp_path / "x_####.cbf"
    scanner = CbfScanner(template, images=2, start=10)
    write_cbf(image, cbf_file_name(template, 10))
    write_cbf(image, cbf_file_name(template, 1))  # not part of this collection
    assert [ref.image_number for ref in scanner.scan()] == [10]
    assert scanner.pending == [11]


# --- EIGER / NeXus scanning ------------------------------------------------------------------


def test_eiger_frames_appear_with_master_and_data_files(tmp_path):
    (tmp_path / "full").mkdir()
    written = write_nexus(generate_frames(5, SMALL, seed=2), tmp_path / "full" / "scan_master.h5",
                          frames_per_file=2)
    data_files = nexus_file_names(written, 3)
    watched = tmp_path / "watched" / "scan_master.h5"
    watched.parent.mkdir()
    scanner = NexusScanner(watched, images=5)

    shutil.copy(data_files[0], watched.parent)
    assert scanner.scan() == []  # no master yet
    shutil.copy(written, watched)
    assert scanner.scan() == [FrameRef(1, str(watched), 0), FrameRef(2, str(watched), 1)]
    assert scanner.scan() == []
    shutil.copy(data_files[2], watched.parent)  # out of order: its image_nr_low places it
    assert scanner.scan() == [FrameRef(5, str(watched), 4)]
    shutil.copy(data_files[1], watched.parent)
    assert [(ref.image_number, ref.frame_index) for ref in scanner.scan()] == [(3, 2), (4, 3)]
    assert scanner.pending == []


_SWMR_WRITER = textwrap.dedent("""
    import sys, h5py, numpy as np
    handle = h5py.File(sys.argv[1], "w", libver="latest")
    data = handle.create_dataset("/entry/data/data", shape=(0, 16, 16), maxshape=(None, 16, 16),
                                 dtype="uint32", chunks=(1, 16, 16))
    handle.swmr_mode = True
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "append":
            data.resize(data.shape[0] + 1, axis=0)
            data[-1] = np.full((16, 16), data.shape[0], dtype="uint32")
        elif command == "extend":  # room for a frame whose data is not written yet
            data.resize(data.shape[0] + 1, axis=0)
        elif command == "fill":
            data[-1] = 7
        data.flush()
        print("done", flush=True)
    handle.close()
""")


def test_eiger_data_file_growing_under_a_swmr_writer(tmp_path):
    master = write_nexus(generate_frames(1, SMALL, seed=3), tmp_path / "grow_master.h5", frames_per_file=10)
    data_file = nexus_file_names(master, 1)[0]
    data_file.unlink()  # the real data file is written frame by frame by another process
    writer = subprocess.Popen([sys.executable, "-c", _SWMR_WRITER, str(data_file)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def tell(command: str) -> None:
        writer.stdin.write(command + "\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "done"

    try:
        assert writer.stdout.readline().strip() == "ready"
        scanner = NexusScanner(master, images=4)
        assert scanner.scan() == []  # the data file exists, still empty
        tell("append")
        tell("append")
        assert [ref.frame_index for ref in scanner.scan()] == [0, 1]
        tell("extend")  # the dataset has a third frame whose chunk is not written yet
        assert scanner.scan() == []
        tell("fill")
        tell("append")
        assert [ref.frame_index for ref in scanner.scan()] == [2, 3]
        assert scanner.pending == []
    finally:
        writer.stdin.close()
        writer.wait(30)


# --- publishing to the real broker -----------------------------------------------------------


@pytest.mark.kafka
def test_watcher_publishes_each_image_once_and_reports_the_missing_one(kafka_settings, tmp_path, image):
    template = tmp_path / "grid_####.cbf"
    dcid = 424242
    write_cbf(image, cbf_file_name(template, 2))
    write_cbf(image, cbf_file_name(template, 1))

    def detector() -> None:  # images 3 and 4 land while the watcher runs; 5 never does
        time.sleep(0.4)
        write_cbf(image, cbf_file_name(template, 4))
        time.sleep(0.3)
        write_cbf(image, cbf_file_name(template, 3))

    reader = TopicReader(kafka_settings, ["images", "collections"])
    writer = threading.Thread(target=detector)
    try:
        with EventPublisher(kafka_settings) as publisher:
            writer.start()
            started = time.monotonic()
            report = watch(publisher, dcid, str(template), 5, timeout_s=1.5, poll_s=0.05, end=True)
            elapsed = time.monotonic() - started
        writer.join()
        assert report.emitted == 4 and report.missing == [5] and report.status == "incomplete"
        assert report.timed_out and report.ended_published
        assert 1.5 <= elapsed < 10

        reader.wait_for(lambda: len(reader.values("collections", "CollectionEnded", dcid)) == 1, 30,
                        "CollectionEnded")
        time.sleep(1)  # a duplicate would have arrived by now
        events = reader.values("images", "ImageArrived", dcid)
        assert sorted(e["image_number"] for e in events) == [1, 2, 3, 4]
        for event in events:
            assert event["file_path"] == str(cbf_file_name(template, event["image_number"]))
            assert event["frame_index"] == 0 and event["source"] == "watcher"
        # Images found in one poll go out together in image-number order (stamped in that order: image
        # events are keyed dcid:image, so they sit on different partitions and the reader's order says nothing).
        by_arrival = sorted(events, key=lambda e: e["arrival_time"])
        assert {e["image_number"] for e in by_arrival[:2]} == {1, 2}
        first = {e["image_number"]: e["arrival_time"] for e in events}
        assert first[1] <= first[2]
        ended = reader.values("collections", "CollectionEnded", dcid)[0]
        assert ended["images_collected"] == 4 and ended["status"] == "incomplete"
    finally:
        reader.close()


@pytest.mark.kafka
def test_watcher_announces_eiger_frames_by_master_and_frame_index(kafka_settings, tmp_path):
    master = write_nexus(generate_frames(5, SMALL, seed=4), tmp_path / "scan_master.h5", frames_per_file=2)
    dcid = 515151
    reader = TopicReader(kafka_settings, ["images", "collections"])
    try:
        with EventPublisher(kafka_settings) as publisher:
            stop = threading.Event()
            report = watch(publisher, dcid, str(master), 5, start=3, timeout_s=5, end=True, stop=stop)
        assert report.status == "success" and report.emitted == 5 and not report.missing

        reader.wait_for(lambda: len(reader.values("collections", "CollectionEnded", dcid)) == 1, 30,
                        "CollectionEnded")
        time.sleep(1)
        events = sorted(reader.values("images", "ImageArrived", dcid), key=lambda e: e["image_number"])
        assert [(e["image_number"], e["frame_index"]) for e in events] == [(3, 0), (4, 1), (5, 2), (6, 3), (7, 4)]
        assert {e["file_path"] for e in events} == {str(master)}
        assert reader.values("collections", "CollectionEnded", dcid)[0]["status"] == "success"
    finally:
        reader.close()


def test_a_stop_request_ends_the_watch_with_a_report(tmp_path):
    class NoKafka:
        def publish(self, events):  # nothing is found, so nothing is published
            raise AssertionError("unexpected publish")

    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    report = watch(NoKafka(), 1, str(tmp_path / "x_####.cbf"), 3, timeout_s=None, poll_s=0.05, stop=stop)
    assert report.stopped and report.missing == [1, 2, 3] and report.status == "incomplete"
    assert np.isclose(report.elapsed_s, 0.3, atol=0.3)
