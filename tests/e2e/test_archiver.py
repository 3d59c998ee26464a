"""The archiving consumer: manifests with sizes and SHA-256 of every file, one ArchiveComplete per
collection however often it runs, dead letters for what cannot be archived (a real broker)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from beamstream.connectors.archiver import Archiver
from beamstream.connectors.manifests import (
    build_manifest,
    expected_files,
    manifest_path,
    template_stem,
    write_manifest,
)
from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.synthetic import SyntheticSpec, generate_image
from beamstream.diffraction.writers import write_nexus
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import load_settings
from beamstream.platform.topics import topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started
from beamstream.schemas.keys import dcid_key
from tests.helpers.harness import TopicReader, service_env


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cbf_series(folder: Path, stem: str, numbers, rng) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in numbers:
        path = folder / f"{stem}_{n:04d}.cbf"
        path.write_bytes(rng.bytes(1000 + 37 * n))
        paths.append(path)
    return paths


def test_template_stems_and_manifest_places():
    assert template_stem("/d/thau_1_####.cbf") == "thau_1"
    assert template_stem("/d/scan_master.h5") == "scan_master"
    assert template_stem("/d/####.cbf") == "collection"
    started = {"dcid": 7, "file_template": "/d/x/thau_1_####.cbf", "processing_job_id": None}
    assert manifest_path(started) == Path("/d/x/thau_1.manifest.json")
    assert manifest_path({**started, "processing_job_id": 3}, "/archive") == Path("/archive/7/thau_1.pj3.manifest.json")


def test_eiger_manifest_lists_the_master_and_its_data_files(tmp_path):
    full = generate_image(SyntheticSpec(detector="eiger2_4m"), seed=3)
    small = DiffractionImage(full.data[:64, :48].copy(), full.mask[:64, :48].copy(),
                             dataclasses.replace(full.geometry, image_size_px=(48, 64)))
    master = write_nexus([small] * 5, tmp_path / "scan_master.h5", frames_per_file=2)
    files = expected_files(str(master), 1, 5)
    assert [p.name for p in files] == ["scan_master.h5", "scan_data_000001.h5", "scan_data_000002.h5",
                                       "scan_data_000003.h5"]
    (tmp_path / "scan_data_000002.h5").unlink()  # linked from the master, so known to be missing
    started = {"dcid": 9, "file_template": str(master), "number_of_images": 5, "start_image_number": 1}
    manifest = build_manifest(started, {"images_collected": 5, "status": "success"})
    assert not manifest["complete"]
    assert manifest["missing"] == [str(tmp_path / "scan_data_000002.h5")]
    assert {Path(f["path"]).name: f["sha256"] for f in manifest["files"]} == {
        p.name: _sha256(p) for p in (master, tmp_path / "scan_data_000001.h5", tmp_path / "scan_data_000003.h5")}


def test_an_identical_manifest_is_not_rewritten(tmp_path):
    path = tmp_path / "m" / "x.manifest.json"
    digest, written = write_manifest(path, {"dcid": 1, "files": []})
    assert written and digest == _sha256(path)
    before = path.stat().st_mtime_ns
    assert write_manifest(path, {"files": [], "dcid": 1}) == (digest, False)
    assert path.stat().st_mtime_ns == before
    assert write_manifest(path, {"dcid": 2, "files": []})[1]


def _run_until(archiver: Archiver, done, timeout: float = 60) -> None:
    """Run the archiver in a thread until ``done()`` holds, then stop it as SIGTERM would."""
    thread = threading.Thread(target=archiver.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"archiver stats after {timeout:.0f} s: {archiver.stats}"
            assert thread.is_alive(), "the archiver stopped on its own"
            time.sleep(0.1)
    finally:
        archiver.stop_event.set()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.kafka
def test_manifests_and_exactly_one_archive_complete_even_when_run_twice(kafka_settings, tmp_path):
    settings = kafka_settings
    rng = np.random.default_rng(5)
    whole = _cbf_series(tmp_path / "grid", "thau_1", range(1, 4), rng)
    partial = _cbf_series(tmp_path / "rot", "lys_2", (1, 2, 4), rng)  # image 3 never written
    collections = topic_name(settings, "collections")

    with EventPublisher(settings) as publisher:
        publisher.publish([
            collection_started(1, file_template=str(tmp_path / "grid" / "thau_1_####.cbf"), number_of_images=3,
                               beamline="i03"),
            collection_started(2, file_template=str(tmp_path / "rot" / "lys_2_####.cbf"), number_of_images=4),
            collection_ended(1, 3), collection_ended(2, 4),
            collection_ended(3, 10),  # never started: nothing to archive from
        ])
    producer = make_producer(settings)
    producer.produce(collections, b"\x00\x01 not an event", dcid_key(4))
    producer.flush(10)

    reader = TopicReader(settings, ["archive", "deadletter"])
    try:
        first = Archiver(settings)
        _run_until(first, lambda: first.stats["archived"] == 2 and first.stats["dead_letters"] == 2)

        manifest = json.loads((tmp_path / "grid" / "thau_1.manifest.json").read_text())
        assert manifest["complete"] and manifest["missing"] == [] and manifest["beamline"] == "i03"
        assert manifest["files"] == [{"path": str(p), "size": p.stat().st_size, "sha256": _sha256(p)} for p in whole]
        assert manifest["total_bytes"] == sum(p.stat().st_size for p in whole)
        incomplete = json.loads((tmp_path / "rot" / "lys_2.manifest.json").read_text())
        assert not incomplete["complete"]
        assert incomplete["missing"] == [str(tmp_path / "rot" / "lys_2_0003.cbf")]
        assert [f["path"] for f in incomplete["files"]] == [str(p) for p in partial]

        reader.wait_for(lambda: len(reader.values("archive")) == 2 and len(reader.values("deadletter")) == 2, 30,
                        "two archive events and two dead letters")
        events = {e["dcid"]: e for e in reader.values("archive")}
        grid_manifest = tmp_path / "grid" / "thau_1.manifest.json"
        assert events[1]["complete"] and events[1]["files"] == 3
        assert events[1]["manifest_path"] == str(grid_manifest)
        assert events[1]["manifest_sha256"] == _sha256(grid_manifest)
        assert not events[2]["complete"] and events[2]["missing_files"] == incomplete["missing"]
        letters = {d["error_type"]: d for d in reader.values("deadletter")}
        assert sorted(letters) == ["CorruptMessageError", "MissingCollectionStarted"]
        assert letters["MissingCollectionStarted"]["dcid"] == 3
        assert letters["CorruptMessageError"]["payload"] == b"\x00\x01 not an event"
        assert {d["service"] for d in letters.values()} == {f"archiver/{collections}"}

        # The same collection ends again (a replay, a reinjection): same group, then a brand-new one.
        written_at = grid_manifest.stat().st_mtime_ns
        with EventPublisher(settings) as publisher:
            publisher.publish([collection_ended(1, 3)])
        second = Archiver(settings)
        _run_until(second, lambda: second.stats["skipped"] == 1)
        fresh = Archiver(settings, group_id=f"{settings.topic_prefix}archiver-fresh")
        _run_until(fresh, lambda: fresh.stats["skipped"] == 3 and fresh.stats["dead_letters"] == 2)
        assert second.stats["archived"] == fresh.stats["archived"] == 0
        reader.wait_for(lambda: len(reader.values("deadletter")) == 4, 30, "the fresh group's dead letters")
        assert len(reader.values("archive")) == 2, "a collection was archived twice"
        assert grid_manifest.stat().st_mtime_ns == written_at, "an identical manifest was rewritten"
    finally:
        reader.close()


@pytest.mark.kafka
def test_archiver_command_logs_json_and_stops_cleanly_on_sigterm(kafka_settings, tmp_path):
    archive_root = tmp_path / "archive"
    settings = load_settings(bootstrap_servers=kafka_settings.kafka_bootstrap, home=kafka_settings.home,
                             topic_prefix=kafka_settings.topic_prefix, image_partitions=4,
                             archive_root=str(archive_root))
    files = _cbf_series(tmp_path / "data", "x", (1, 2), np.random.default_rng(1))
    with EventPublisher(settings) as publisher:
        publisher.publish([collection_started(55, file_template=str(tmp_path / "data" / "x_####.cbf"),
                                              number_of_images=2, processing_job_id=8),
                           collection_ended(55, 2, processing_job_id=8)])
    reader = TopicReader(settings, ["archive"])
    log = tmp_path / "archiver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "beamstream", "archiver"], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**service_env(settings), "BEAMSTREAM_ARCHIVE_ROOT": str(archive_root)})
    try:
        reader.wait_for(lambda: reader.values("archive"), 60, "the archive event")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        reader.close()
    [event] = reader.values("archive")
    manifest = archive_root / "55" / "x.pj8.manifest.json"
    assert event["manifest_path"] == str(manifest) and event["processing_job_id"] == 8 and event["complete"]
    assert [f["sha256"] for f in json.loads(manifest.read_text())["files"]] == [_sha256(p) for p in files]
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON
    messages = [entry["message"] for entry in lines]
    assert "collection archived" in messages and messages[-1] == "archiver stopped"
    assert all(entry["service"] == "archiver" for entry in lines)
