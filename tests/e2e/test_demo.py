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
    engine = make_engine(load_settings(environ=service_env(kafka_settings)).database_url)
    record = read_collection(engine, dcid)
    engine.dispose()
    assert (record.number_of_images, record.experiment_type, record.grid["columns"]) == (12, "grid", 4)
    assert "archive manifest: " in out and " files, " in out and "MB, complete)" in out
