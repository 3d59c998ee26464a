"""The README's first command, small: a simulated grid scan through real workers."""

import re
import subprocess
import sys

import pytest

from beamstream.connectors.ispyb_collections import read_collection
from beamstream.connectors.ispyb_schema import make_engine
from beamstream.platform.settings import load_settings
from tests.helpers.harness import service_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_demo_prints_heat_map_and_xray_centre(kafka_settings):
    result = subprocess.run(
        [sys.executable, "-m", "beamstream", "demo", "--rows", "3", "--cols", "4", "--rate", "10",
         "--workers", "1", "--seed", "3", "--no-dashboard"],
        env=service_env(kafka_settings), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # The progress bars (stderr) end full: every image announced, every image analysed.
    for bar in ("images announced", "images analysed"):
        assert re.findall(rf"{bar} *: *\d+%\|[^|]*\| (\d+)/12", result.stderr)[-1] == "12", bar
    assert "spots per grid position" in out and "12/12 images, complete" in out
    assert "X-ray centre: row" in out and "true crystal centre: row" in out
    found = out.split("X-ray centre: row ")[1].split(",")[0]
    true = out.split("true crystal centre: row ")[1].split(",")[0]
    assert abs(float(found) - float(true)) <= 1.0
    assert "ISPyB: 12 rows for dcid" in out
    # The collection is in ISPyB as the acquisition system would have written it, so `go` can reprocess it.
    dcid = int(out.split("simulated grid scan dcid ")[1].split(":")[0])
    record = _ispyb_collection(kafka_settings, dcid)
    assert (record.number_of_images, record.experiment_type, record.grid["columns"]) == (12, "grid", 4)
    assert "archive manifest: " in out and " files, " in out and "MB, complete)" in out


def _millimetres(out: str, label: str) -> tuple[float, float]:
    """(x, y) of the first ``<label> x X mm, y Y mm`` in the demo's output."""
    [(x, y)] = re.findall(rf"{re.escape(label)} x (-?[\d.]+) mm, y (-?[\d.]+) mm", out)[:1]
    return float(x), float(y)


@pytest.mark.parametrize("flag", ["--bluesky", "--bluesky-kafka"])
def test_bluesky_demo_moves_the_motors_to_the_xray_centre(kafka_settings, flag):
    """A RunEngine plan scans the seed's crystal (5x6, 20 um steps), gets the centre back, moves there."""
    result = subprocess.run(
        [sys.executable, "-m", "beamstream", "demo", flag, "--rows", "5", "--cols", "6", "--workers", "1",
         "--seed", "3", "--no-dashboard"],
        env=service_env(kafka_settings), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.findall(r"images analysed *: *\d+%\|[^|]*\| (\d+)/30", result.stderr)[-1] == "30"
    assert "Traceback" not in result.stderr and "not published" not in result.stderr  # the callback took every doc
    assert "spots per grid position" in out and "30/30 images, complete" in out
    assert ("through bluesky-kafka and the bridge" in out) == (flag == "--bluesky-kafka")
    found_row, found_column = map(float, re.findall(r"X-ray centre: row ([\d.]+), column ([\d.]+)", out)[0])
    true_row, true_column = map(float, re.findall(r"true crystal centre: row ([\d.]+), column ([\d.]+)", out)[0])
    assert abs(found_row - true_row) <= 1.0 and abs(found_column - true_column) <= 1.0, out
    centre, motors = _millimetres(out, "the plan got the X-ray centre"), _millimetres(out, "motors now at")
    crystal = _millimetres(out, "true crystal position:")
    assert abs(centre[0] - crystal[0]) <= 0.02 and abs(centre[1] - crystal[1]) <= 0.02, out  # one grid step
    assert motors == pytest.approx(centre, abs=1e-4) and centre != (0.0, 0.0)  # moved from (0, 0) to the centre
    # The same crystal as `simulate` draws for the seed, in grid units and in mm.
    assert crystal == pytest.approx((true_column * 0.02, true_row * 0.02), abs=2e-4)  # printed rounded
    assert "ISPyB: 30 rows for dcid" in out
    dcid = int(out.split("Bluesky grid scan dcid ")[1].split(":")[0])
    record = _ispyb_collection(kafka_settings, dcid)
    assert (record.number_of_images, record.experiment_type, record.grid["columns"]) == (30, "grid", 6)
    assert record.file_template.endswith(f"grid_{dcid}_master.h5")
    assert "archive manifest: " in out and "MB, complete)" in out


def test_bluesky_demo_without_the_extra_says_what_to_install(kafka_settings):
    """The README installs `pip install -e .`: without bluesky, one line naming the extra, before any connection."""
    code = ("import sys; sys.modules['bluesky'] = None; from beamstream.cli.main import main; "
            "sys.exit(main(['demo', '--bluesky', '--no-dashboard']))")
    env = {**service_env(kafka_settings), "BEAMSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # nothing may connect
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == ("beamstream demo: error: --bluesky needs the bluesky extra: "
                                     "pip install -e '.[bluesky]' (no module bluesky)")
    assert result.stdout == ""


def _ispyb_collection(kafka_settings, dcid: int):
    """The demo's ISPyB record of collection ``dcid`` (its database is the settings' default)."""
    engine = make_engine(load_settings(environ=service_env(kafka_settings)).database_url)
    try:
        return read_collection(engine, dcid)
    finally:
        engine.dispose()
