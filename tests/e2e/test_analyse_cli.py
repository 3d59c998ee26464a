"""``beamstream analyse``: real CBFs and a generated EIGER series through the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from beamstream.cli.commands import analyse
from beamstream.diffraction.analysis import IMAGE_ANALYSIS_FIELDS
from beamstream.diffraction.synthetic import SyntheticSpec, generate_frames
from beamstream.diffraction.writers import write_nexus
from beamstream.errors import BeamstreamError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
THAUMATIN = DATA / "thaumatin_grid"
FIELDS = {"file", "image_number", *IMAGE_ANALYSIS_FIELDS}


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``beamstream analyse`` in a fresh interpreter (the main CLI once it registers the command)."""
    from beamstream.cli import main as main_cli

    if "analyse" in getattr(main_cli, "COMMAND_MODULES", ()):
        command = [sys.executable, "-m", "beamstream", "analyse", *args]
    else:
        command = [sys.executable, "-m", "beamstream.cli.commands.analyse", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """Three EIGER2 4M frames: strong, empty, medium."""
    folder = tmp_path_factory.mktemp("series")
    frames = generate_frames(3, SyntheticSpec(detector="eiger2_4m"), seed=31, strengths=[1.0, 0.0, 0.6])
    return write_nexus(frames, folder / "scan_master.h5", frames_per_file=2)


def test_json_lines_for_real_cbfs():
    files = [THAUMATIN / "thau_3_2_0002.cbf.bz2", THAUMATIN / "thau_3_2_0016.cbf.bz2"]
    result = cli(*map(str, files), "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(row["file"]).name for row in rows] == [f.name for f in files]
    assert all(set(row) == FIELDS for row in rows)
    assert all(row["image_number"] == 1 for row in rows)
    crystal, blank = rows
    assert crystal["n_spots_total"] > 500 and crystal["n_spots_no_ice"] <= crystal["n_spots_total"]
    assert 1.0 < crystal["estimated_d_min"] < 4.0
    assert blank["n_spots_total"] < 5 and blank["estimated_d_min"] is None
    assert "Traceback" not in result.stderr


def test_bad_image_number_is_one_line_and_exit_2():
    result = cli(f"{THAUMATIN / 'thau_3_2_0001.cbf.bz2'}:2")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no image 2; the file holds 1 image" in lines[0]
    assert "Traceback" not in result.stderr


def test_table_with_image_selection_in_process(series, capsys):
    code = analyse.main([f"{series}:1,3", "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[:4] == ["image", "#spots", "#spots_no_ice", "total_intensity"]
    assert "d_min (distl method 1)" in out[0] and "d_min (distl method 2)" in out[0]
    assert [line.split()[0] for line in out[2:]] == ["1", "3"]


def test_process_pool_gives_the_same_rows(series, capsys):
    def rows(*extra: str) -> list[dict]:
        assert analyse.main([str(series), "--json", "--no-progress", *extra]) == 0
        parsed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for row in parsed:
            del row["time_threshold_s"], row["time_total_s"]
        return parsed

    sequential = rows()
    assert [row["image_number"] for row in sequential] == [1, 2, 3]
    assert sequential[0]["n_spots_no_ice"] > sequential[2]["n_spots_no_ice"] > sequential[1]["n_spots_no_ice"] == 0
    assert rows("--nproc", "2") == sequential


def test_resolution_and_threshold_options_reach_the_analysis(series, capsys):
    assert analyse.main([f"{series}:1", "--json", "--no-progress"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert analyse.main([f"{series}:1", "--json", "--no-progress", "--d-min", "3.0", "--threshold", "dispersion",
                         "--backend", "numpy"]) == 0
    limited = json.loads(capsys.readouterr().out)
    assert limited["n_spots_total"] < full["n_spots_total"]
    assert limited["estimated_d_min"] >= 3.0 - 0.2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.cbf"], "missing.cbf: no such file"),
        (["{series}:0"], "image numbers start at 1"),
        (["{series}:2-9"], "no image 4; the file holds 3 images (1-3)"),
        (["{series}:3-1"], "runs backwards"),
        (["{series}", "--d-min", "-1"], "d_min must be > 0"),
        (["{series}", "--d-min", "3", "--d-max", "2"], "d_min = 3.0 > d_max = 2.0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(series, capsys, argv, message):
    code = analyse.main([arg.format(series=series) for arg in argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and message in captured.err
    assert captured.err.startswith("beamstream analyse: error: ")


@pytest.mark.parametrize(("argv", "message"), [
    (["x.cbf", "--threshold", "bogus"], "argument --threshold: invalid choice"),
    (["x.cbf", "--nproc", "0"], "argument --nproc: must be at least 1, got 0"),
])
def test_argparse_errors_are_one_line_too(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        analyse.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_image_selection_syntax():
    assert analyse.parse_images("7") == [7]
    assert analyse.parse_images("1-3,8, 2") == [1, 2, 3, 8]
    for bad in ("0", "a", "1-", "3-1", ""):
        with pytest.raises(BeamstreamError):
            analyse.parse_images(bad)
    assert analyse.parse_input("scan_master.h5:2-4") == (Path("scan_master.h5"), [2, 3, 4])
    assert analyse.parse_input("odd:name.cbf") == (Path("odd:name.cbf"), None)
