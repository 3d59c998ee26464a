"""The detector simulator through the real producers and a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from beamstream.diffraction.centring import GridShape, find_xray_centre
from beamstream.diffraction.readers import count_frames, open_image
from beamstream.producers.simulator import SimulationError, grid_crystal, simulate_gridscan, simulate_rotation
from beamstream.streams.analysers import analyse_file
from tests.helpers.harness import TopicReader, service_env

SMALL = "eiger2-1m"  # the fastest preset to draw


def beamstream(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beamstream", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _collection_events(reader: TopicReader, dcid: int, images: int) -> tuple[list, dict, dict]:
    reader.wait_for(lambda: len(reader.values("collections", "CollectionEnded", dcid)) >= 1, 30, "CollectionEnded")
    reader.wait_for(lambda: len(reader.values("images", "ImageArrived", dcid)) >= images, 10, "the image events")
    time.sleep(1)  # a duplicate would have arrived by now
    started = reader.values("collections", "CollectionStarted", dcid)
    ended = reader.values("collections", "CollectionEnded", dcid)
    assert len(started) == 1 and len(ended) == 1
    return reader.values("images", "ImageArrived", dcid), started[0], ended[0]


def test_grid_crystal_is_inside_the_grid_and_seeded():
    for seed in range(20):
        crystal = grid_crystal(6, 9, seed)
        row, column = crystal.centre
        assert 0 <= row <= 5 and 0 <= column <= 8
        strengths = np.array(crystal.strengths)
        # The strongest position is the one nearest the centre: a heat map has a clear X-ray centre.
        assert np.unravel_index(strengths.argmax(), strengths.shape) == (round(row), round(column))
        assert strengths.min() == 0.0
    assert grid_crystal(6, 9, 1) == grid_crystal(6, 9, 1)
    assert len({grid_crystal(6, 9, seed).centre for seed in range(10)}) == 10


@pytest.mark.kafka
def test_cbf_gridscan_announces_every_image_once(kafka_settings, tmp_path):
    reader = TopicReader(kafka_settings, ["images", "collections"])
    try:
        report = simulate_gridscan(kafka_settings, 3, 4, 20.0, detector=SMALL, fmt="cbf", out_dir=tmp_path, seed=5)
        assert report.status == "success" and report.emitted == 12 and report.missing == []
        row, column = report.true_centre
        assert 0 <= row <= 2 and 0 <= column <= 3

        events, started, ended = _collection_events(reader, report.dcid, 12)
        assert Counter(e["image_number"] for e in events) == Counter(range(1, 13))
        assert {e["source"] for e in events} == {"simulator"}
        assert started["experiment_type"] == "grid" and started["number_of_images"] == 12
        assert started["file_template"] == report.file_template == str(tmp_path / f"grid_{report.dcid}_####.cbf")
        assert started["grid"] == {"rows": 3, "columns": 4, "step_x_um": 20.0, "step_y_um": 20.0,
                                   "origin_x_mm": 0.0, "origin_y_mm": 0.0, "snaked": True, "plane": "xy"}
        assert started["detector"]["name"] == "EIGER2 X 1M"
        assert (started["detector"]["width_px"], started["detector"]["height_px"]) == (1028, 1062)
        assert ended["images_collected"] == 12 and ended["status"] == "success"

        assert len(report.files) == 12
        for event in events:
            image = open_image(event["file_path"], event["frame_index"])
            assert image.data.shape == (1062, 1028)
        assert not any(p.name.startswith(".staging") for p in tmp_path.iterdir())  # staging cleaned up
        assert report.timings["released"] == 12 and report.timings["render_rate_hz"] > 0

        # The workers' analysis of these files finds the crystal where the simulator put it.
        shape = GridShape(3, 4, snaked=True)
        counts = np.zeros((3, 4), dtype=int)
        for event in events:
            result = analyse_file(event["file_path"], event["frame_index"])
            counts[shape.position(event["image_number"] - 1)] = result["n_spots_no_ice"]
        found = find_xray_centre(counts)
        assert abs(found.centre_row - row) < 1 and abs(found.centre_column - column) < 1, (counts, report.true_centre)
    finally:
        reader.close()


@pytest.mark.kafka
def test_nexus_gridscan_is_deterministic_by_seed(kafka_settings, tmp_path):
    reader = TopicReader(kafka_settings, ["images", "collections"])
    try:
        first = simulate_gridscan(kafka_settings, 3, 4, 20.0, detector=SMALL, fmt="nexus", out_dir=tmp_path / "a",
                                  seed=11, frames_per_file=5)
        second = simulate_gridscan(kafka_settings, 3, 4, 20.0, detector=SMALL, fmt="nexus",
                                   out_dir=tmp_path / "b", seed=11, frames_per_file=5)
        assert first.dcid != second.dcid
        assert first.true_centre == second.true_centre and first.strengths == second.strengths

        master = Path(first.file_template)
        assert master.name.endswith("_master.h5") and len(first.files) == 1 + 3  # master + 3 data files
        assert count_frames(master) == 12
        for frame in (0, 6, 11):  # same pixels, frame by frame
            assert np.array_equal(open_image(master, frame).data, open_image(second.file_template, frame).data)

        events, started, ended = _collection_events(reader, first.dcid, 12)
        assert sorted((e["image_number"], e["frame_index"]) for e in events) == [(n, n - 1) for n in range(1, 13)]
        assert {e["file_path"] for e in events} == {str(master)}
        assert ended["status"] == "success"
    finally:
        reader.close()


@pytest.mark.kafka
def test_rotation_releases_frames_at_the_rate(kafka_settings, tmp_path):
    reader = TopicReader(kafka_settings, ["images", "collections"])
    try:
        report = simulate_rotation(kafka_settings, 6, 10.0, detector=SMALL, fmt="cbf", out_dir=tmp_path, seed=2,
                                   oscillation_width_deg=0.5, prerender=True)
        assert report.status == "success" and report.true_centre is None
        assert report.timings["late_frames"] == 0
        assert 8.0 <= report.timings["achieved_rate_hz"] <= 12.0

        events, started, ended = _collection_events(reader, report.dcid, 6)
        assert sorted(e["image_number"] for e in events) == list(range(1, 7))
        assert started["experiment_type"] == "rotation" and started["grid"] is None
        assert started["oscillation_width_deg"] == 0.5
        assert open_image(report.files[3]).metadata["start_angle"] == pytest.approx(1.5)
    finally:
        reader.close()


@pytest.mark.kafka
def test_a_stopped_simulation_ends_the_collection_as_aborted(kafka_settings, tmp_path):
    reader = TopicReader(kafka_settings, ["images", "collections"])
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    try:
        report = simulate_gridscan(kafka_settings, 10, 10, 5.0, detector=SMALL, fmt="cbf", out_dir=tmp_path,
                                   seed=1, stop=stop)
        assert report.status == "aborted" and report.emitted < 100
        reader.wait_for(lambda: reader.values("collections", "CollectionEnded", report.dcid), 30, "CollectionEnded")
        ended = reader.values("collections", "CollectionEnded", report.dcid)[0]
        assert ended["status"] == "aborted" and ended["images_collected"] == report.emitted
    finally:
        reader.close()


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    settings_home = tmp_path / "home"
    from beamstream.platform.settings import load_settings

    settings = load_settings(home=settings_home, data_roots=(str(tmp_path / "data"),))
    with pytest.raises(SimulationError, match="outside the configured data roots"):
        simulate_gridscan(settings, 2, 2, 10.0, out_dir=tmp_path / "elsewhere")
    with pytest.raises(SimulationError, match="unknown detector"):
        simulate_gridscan(settings, 2, 2, 10.0, detector="pilatus9000")
    with pytest.raises(SimulationError, match="rate"):
        simulate_rotation(settings, 2, 0.0)
    with pytest.raises(SimulationError, match="at least one row"):
        simulate_gridscan(settings, 0, 2, 10.0)


# --- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("args, code, message", [
    (("simulate", "gridscan", "--rows", "0", "--cols", "3"), 2, "argument --rows: must be at least 1"),
    (("simulate", "gridscan", "--rows", "2", "--cols", "3", "--detector", "pilatus9000"), 2, "unknown detector"),
    (("simulate", "rotation", "--images", "3", "--rate", "-5"), 2, "argument --rate"),
    (("watch", "--dcid", "1", "--template", "/data/thau_1.cbf", "--images", "3"), (1, 2), "has no '#'"),
    (("watch", "--dcid", "1", "--template", "/data/x_####.cbf", "--images", "0"), 2, "argument --images"),
])
def test_bad_command_lines_are_one_line_errors(args, code, message):
    result = beamstream(*args)
    assert result.returncode in (code if isinstance(code, tuple) else (code,))
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.kafka
def test_simulate_command_prints_a_json_report(kafka_settings, tmp_path):
    result = beamstream("simulate", "gridscan", "--rows", "2", "--cols", "2", "--rate", "20", "--detector", SMALL,
                        "--out", str(tmp_path), "--seed", "3", "--dcid", "777", "--json",
                        env=service_env(kafka_settings))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dcid"] == 777 and report["status"] == "success" and report["emitted"] == 4
    assert report["format"] == "nexus" and Path(report["file_template"]).parent == tmp_path


def _wait_until_it_catches(pid: int, signum: int, timeout: float = 60) -> None:
    """Wait until the process has a handler for ``signum`` (Linux: the SigCgt mask in /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signum - 1)):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} never installed a handler for signal {signum}")


@pytest.mark.kafka
def test_watch_command_stops_cleanly_on_sigterm(kafka_settings, tmp_path):
    reader = TopicReader(kafka_settings, ["collections"])
    process = subprocess.Popen(
        [sys.executable, "-m", "beamstream", "watch", "--dcid", "9090", "--template", str(tmp_path / "x_####.cbf"),
         "--images", "3", "--timeout", "120", "--end", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=service_env(kafka_settings))
    try:
        _wait_until_it_catches(process.pid, signal.SIGTERM)  # started and watching: a clean stop is possible
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 128 + signal.SIGTERM, stderr
        report = json.loads(stdout)
        assert report["stopped"] and report["missing"] == [1, 2, 3] and report["ended_published"]
        assert "Traceback" not in stderr
        reader.wait_for(lambda: reader.values("collections", "CollectionEnded", 9090), 30, "CollectionEnded")
        assert reader.values("collections", "CollectionEnded", 9090)[0]["status"] == "incomplete"
    finally:
        if process.poll() is None:
            process.kill()
        reader.close()
