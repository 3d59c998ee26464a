"""Frames per second of reading + analysing against threads, and the scaling efficiency.

What a worker's analysis stage does with ``--threads N``: N images read and analysed at
once in one process. For each N from 1 to the cores available, every frame of the case is
analysed ``--repeat`` times by a pool of N threads; the rate is frames over wall time and
the efficiency rate(N) / (N x rate(1)) (1.0: every thread as fast as one alone).

Cases: the real PILATUS3 6M thaumatin frames as uncompressed CBF (as a detector writes
them; decompressed once from ``../shared/data``), and synthetic EIGER2 16M frames in an
NXmx master with bitshuffle-LZ4 data files.

Usage: ``python benchmarks/bench_threads.py [--repeat 3] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test helpers

from beamstream.diffraction.synthetic import SyntheticSpec, generate_frames  # noqa: E402
from beamstream.diffraction.writers import write_nexus  # noqa: E402
from beamstream.platform.processes import available_cores  # noqa: E402
from beamstream.streams.analysers import analyse_file  # noqa: E402
from tests.helpers.spotfinding_data import THAUMATIN_DIR, decompressed_thaumatin  # noqa: E402


def rate(targets: list[tuple[str, int]], threads: int, repeat: int) -> float:
    """Frames per second analysing ``targets`` ``repeat`` times with ``threads`` threads."""
    work = targets * repeat
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: analyse_file(*t), targets[:threads]))  # threads started, caches warm
        started = time.perf_counter()
        list(pool.map(lambda t: analyse_file(*t), work))
        return len(work) / (time.perf_counter() - started)


def scaling(case: str, targets: list[tuple[str, int]], repeat: int, runs: int) -> dict:
    """Median rate per thread count over ``runs`` runs, and the efficiency of each."""
    analyse_file(*targets[0])  # numba compilation, imports
    rows = []
    for threads in range(1, available_cores() + 1):
        rates = [rate(targets, threads, repeat) for _ in range(runs)]
        rows.append({"threads": threads, "frames_per_s": round(statistics.median(rates), 2),
                     "runs": [round(r, 2) for r in rates]})
        print(f"  {case}: {threads} thread(s) {rows[-1]['frames_per_s']:.2f} frames/s", file=sys.stderr, flush=True)
    one = rows[0]["frames_per_s"]
    for row in rows:
        row["efficiency"] = round(row["frames_per_s"] / (row["threads"] * one), 3)
    return {"case": case, "frames": len(targets), "repeat": repeat, "scaling": rows}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="passes over every frame per run (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="runs per thread count; the median is reported (3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = {"benchmark": "bench_threads", "cores": available_cores(), "cases": []}
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        folder = Path(tmp)
        cbfs = [(path, 0) for path in decompressed_thaumatin(folder, 8)]
        if not cbfs:
            parser.error(f"no thaumatin frames under {THAUMATIN_DIR}")
        report["cases"].append(scaling("PILATUS3 6M CBF", cbfs, args.repeat, args.runs))
        frames = generate_frames(4, SyntheticSpec(detector="eiger2_16m"), seed=1, strengths=[1.0, 0.7, 0.4, 0.0])
        master = write_nexus(frames, folder / "eiger16m_master.h5", frames_per_file=2)
        report["cases"].append(scaling("EIGER2 16M NXmx bslz4", [(str(master), i) for i in range(4)],
                                       args.repeat, args.runs))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'case':24} {'threads':>7} {'frames/s':>9} {'efficiency':>10}")
        for case in report["cases"]:
            for row in case["scaling"]:
                print(f"{case['case']:24} {row['threads']:7d} {row['frames_per_s']:9.2f} {row['efficiency']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
