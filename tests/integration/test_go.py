"""``beamstream go``: reprocessing a finished collection from ISPyB through the live topics."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from beamstream.cli.main import main
from beamstream.connectors.ispyb_collections import CollectionRecord, create_collection
from beamstream.errors import BeamstreamError
from beamstream.producers.go import GoError, frames, parse_parameters
from tests.helpers.ispyb_helpers import (
    SinkThread,
    end_offsets,
    fresh_database,
    publish,
    read_all,
    result,
    scalar,
    summary,
    wait_until,
)

GRID = {"rows": 4, "columns": 5, "step_x_um": 20.0, "step_y_um": 25.0, "snaked": True}


@pytest.fixture(scope="module")
def maria(mariadb_url):
    engine = fresh_database(mariadb_url)
    yield engine
    engine.dispose()


@pytest.fixture
def go_env(monkeypatch, kafka_settings, maria):
    """Environment pointing the command line at the test's broker, topics and database."""
    monkeypatch.setenv("BEAMSTREAM_BOOTSTRAP_SERVERS", kafka_settings.kafka_bootstrap)
    monkeypatch.setenv("BEAMSTREAM_TOPIC_PREFIX", kafka_settings.topic_prefix)
    monkeypatch.setenv("BEAMSTREAM_IMAGE_PARTITIONS", str(kafka_settings.image_partitions))
    monkeypatch.setenv("BEAMSTREAM_HOME", str(kafka_settings.home))
    monkeypatch.setenv("BEAMSTREAM_ISPYB_URL", maria.url.render_as_string(hide_password=False))
    return kafka_settings


def record(template: str, images: int = 5, start: int = 1) -> CollectionRecord:
    return CollectionRecord(dcid=3, file_template=template, start_image_number=start, number_of_images=images,
                            experiment_type="rotation", ispyb_experiment_type="OSC", beamline="i03", grid=None,
                            sample_id=None, exposure_time_s=None, oscillation_start_deg=None,
                            oscillation_width_deg=None)


# -- pure parts -----------------------------------------------------------------------
def test_parameters_are_parsed():
    assert parse_parameters(["d_min=2.0", "note=a=b", "empty="]) == {"d_min": "2.0", "note": "a=b", "empty": ""}


@pytest.mark.parametrize("bad, message", [
    (["d_min"], "expected key=value"), (["=2"], "the key is empty"), ([" =2"], "the key is empty"),
    (["a=1", "a=2"], "given twice"), (["k" * 81 + "=1"], "longer than 80"),
])
def test_bad_parameters_are_named(bad, message):
    with pytest.raises(BeamstreamError, match=message):
        parse_parameters(bad)


def test_cbf_templates_give_one_file_per_image():
    refs = frames(record("/data/x/thau_3_2_####.cbf", images=3, start=9))
    assert [(f.image_number, f.file_path, f.frame_index) for f in refs] == [
        (9, "/data/x/thau_3_2_0009.cbf", 0), (10, "/data/x/thau_3_2_0010.cbf", 0), (11, "/data/x/thau_3_2_0011.cbf", 0)]


def test_eiger_masters_give_frames_of_one_file():
    refs = frames(record("/data/x/scan_master.h5", images=3))
    assert [(f.image_number, f.file_path, f.frame_index) for f in refs] == [
        (1, "/data/x/scan_master.h5", 0), (2, "/data/x/scan_master.h5", 1), (3, "/data/x/scan_master.h5", 2)]


def test_a_template_without_hashes_is_refused():
    with pytest.raises(GoError, match="no '#'"):
        frames(record("/data/x/image.cbf"))


# -- against the broker and MariaDB -------------------------------------------------------
def jobs(engine, dcid):
    with engine.connect() as conn:
        return conn.execute(text("SELECT * FROM ProcessingJob WHERE dataCollectionId = :d AND automatic = 0"),
                            {"d": dcid}).mappings().all()


@pytest.mark.kafka
def test_go_registers_a_job_and_replays_the_collection(go_env, maria, capsys):
    settings = go_env
    dcid = create_collection(maria, file_template="/data/grid/thau_3_2_####.cbf", number_of_images=20,
                             experiment_type="grid", grid=GRID)

    assert main(["go", str(dcid), "--param", "d_min=2.5", "--param", "backend=numpy"]) == 0
    out = capsys.readouterr().out
    [job] = jobs(maria, dcid)
    job_id = job["processingJobId"]
    assert f"registered ProcessingJob {job_id} and sent 23 events" in out
    assert (job["recipe"], job["displayName"]) == ("per-image-analysis", "beamstream go")
    with maria.connect() as conn:
        params = dict(conn.execute(text("SELECT parameterKey, parameterValue FROM ProcessingJobParameter "
                                        "WHERE processingJobId = :j"), {"j": job_id}).all())
        sweeps = conn.execute(text("SELECT dataCollectionId, startImage, endImage FROM ProcessingJobImageSweep "
                                   "WHERE processingJobId = :j"), {"j": job_id}).all()
    assert params == {"d_min": "2.5", "backend": "numpy"}
    assert [tuple(s) for s in sweeps] == [(dcid, 1, 20)]

    images = sorted((d.value for d in read_all(settings, "images", "ImageArrived", count=20)),
                    key=lambda v: v["image_number"])
    assert [v["image_number"] for v in images] == list(range(1, 21))
    assert {(v["processing_job_id"], v["source"], v["frame_index"]) for v in images} == {(job_id, "go", 0)}
    assert images[6]["file_path"] == "/data/grid/thau_3_2_0007.cbf"
    collection = read_all(settings, "collections", count=2)
    started, ended = sorted(collection, key=lambda d: d.name != "CollectionStarted")
    assert started.name == "CollectionStarted" and ended.name == "CollectionEnded"
    assert started.value["processing_job_id"] == ended.value["processing_job_id"] == job_id
    assert started.value["experiment_type"] == "grid" and started.value["grid"]["columns"] == 5
    assert started.value["grid"]["step_y_um"] == pytest.approx(25.0)
    assert ended.value["images_collected"] == 20
    [request] = read_all(settings, "requests", "ProcessingRequest", count=1)
    assert request.value["kind"] == "reprocess" and request.value["parameters"] == params

    # The results of the job go under an AutoProcProgram of their own; the live results stay as they were.
    publish(settings, "results", "ImageResult", [result(dcid, n) for n in range(1, 21)])
    publish(settings, "results", "ImageResult", [result(dcid, n, job_id, n_spots_total=1000 + n) for n in range(1, 21)])
    publish(settings, "summaries", "CollectionSummary", [summary(dcid, 20, 20, job_id)])
    with SinkThread(settings, maria) as sink:
        wait_until(lambda: scalar(maria, "SELECT count(*) FROM ReprocessedImageQualityIndicators "
                                  "WHERE dataCollectionId = :d", d=dcid) == 20
                   and scalar(maria, "SELECT count(*) FROM ImageQualityIndicators WHERE dataCollectionId = :d",
                              d=dcid) == 20
                   and scalar(maria, "SELECT processingStatus FROM AutoProcProgram WHERE processingJobId = :j",
                              j=job_id) == 1, what="live and reprocessed rows", sink=sink)
        sink.stop()
    assert scalar(maria, "SELECT sum(spotTotal) FROM ImageQualityIndicators WHERE dataCollectionId = :d",
                  d=dcid) == sum(3 * n for n in range(1, 21))
    assert scalar(maria, "SELECT sum(spotTotal) FROM ReprocessedImageQualityIndicators WHERE dataCollectionId = :d",
                  d=dcid) == sum(1000 + n for n in range(1, 21))
    assert scalar(maria, "SELECT count(DISTINCT r.autoProcProgramId) FROM ReprocessedImageQualityIndicators r "
                  "JOIN AutoProcProgram a USING (autoProcProgramId) WHERE a.processingJobId = :j", j=job_id) == 1


@pytest.mark.kafka
def test_dry_run_writes_and_sends_nothing(go_env, maria, capsys):
    dcid = create_collection(maria, file_template="/data/rot/scan_master.h5", number_of_images=30)
    assert main(["go", str(dcid), "--dry-run", "--param", "d_min=2"]) == 0
    out = capsys.readouterr().out
    assert "would register ProcessingJob" in out and "30 images" in out and "dry run" in out
    assert jobs(maria, dcid) == []
    assert sum(end_offsets(go_env, "images").values()) == 0


@pytest.mark.kafka
@pytest.mark.parametrize("argv, message", [
    (["go", "987654321"], "no data collection 987654321 in ISPyB"),
    (["go", "{dcid}", "--param", "d_min"], "--param 'd_min': expected key=value"),
    (["go", "{dcid}", "--param", "=2"], "--param '=2': the key is empty"),
    (["go", "0"], "a dcid is positive"),
    (["go", "twelve"], "a dcid is a whole number"),
])
def test_bad_input_is_one_line_and_writes_nothing(go_env, maria, capsys, argv, message):
    dcid = create_collection(maria, file_template="/data/bad/x_####.cbf", number_of_images=4)
    before = scalar(maria, "SELECT count(*) FROM ProcessingJob")
    code = run_cli([a.format(dcid=dcid) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert scalar(maria, "SELECT count(*) FROM ProcessingJob") == before
    assert sum(end_offsets(go_env, "images").values()) == 0


def run_cli(argv: list[str]) -> int:
    """The command line's exit code, whether it returned it or argparse exited with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)
