"""End-to-end per-image time: read a frame from disk, then the whole analysis (spot finding + statistics).

Cases:

* the real thaumatin PILATUS3 6M CBFs as stored (bzip2) and decompressed;
* a synthetic EIGER2 16M series (NXmx master + bitshuffle-LZ4 data files);
* reader-only timings for both, and synthetic frame generation (the load generator).

Medians over every file and repeat, after a warm-up (numba compilation excluded).
Usage: ``python benchmarks/bench_analysis.py [--repeat 3] [--json]``. The spot-finding
kernel alone is benchmarked by ``benchmarks/bench_spotfinding.py``.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from beamstream.diffraction.analysis import SpotFindingParams, analyse_image
from beamstream.diffraction.readers import open_image
from beamstream.diffraction.synthetic import SyntheticSpec, generate_frames, generate_image
from beamstream.diffraction.writers import write_nexus

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thaumatin_grid"


def _time(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _summary(case: str, timings: list[float], **extra) -> dict:
    return {
        "case": case,
        "median_s": statistics.median(timings),
        "min_s": min(timings),
        "max_s": max(timings),
        "n": len(timings),
        **extra,
    }


def bench_files(case: str, targets: list[tuple[Path, int]], repeat: int, params: SpotFindingParams) -> list[dict]:
    """Reader-only and read+analyse timings over (file, frame) targets."""
    open_image(*targets[0])
    analyse_image(open_image(*targets[0]), params)  # warm-up: imports, numba compilation, caches
    read, total = [], []
    spots = []
    for _ in range(repeat):
        for path, frame in targets:
            read.append(_time(lambda p=path, f=frame: open_image(p, f)))
            started = time.perf_counter()
            result = analyse_image(open_image(path, frame), params)
            total.append(time.perf_counter() - started)
            spots.append(result.n_spots_total)
    return [
        _summary(f"{case}: read", read, images=len(targets)),
        _summary(f"{case}: read + analyse", total, images=len(targets), median_spots=statistics.median(spots)),
    ]


def bench_generation(repeat: int) -> list[dict]:
    """Synthetic frame generation (what the simulator pays per frame)."""
    results = []
    for key in ("pilatus6m", "eiger2_16m"):
        spec = SyntheticSpec(detector=key)
        generate_image(spec, seed=0)  # builds cached maps
        timings = [_time(lambda sp=spec, s=seed: generate_image(sp, seed=s)) for seed in range(1, repeat + 2)]
        results.append(_summary(f"generate synthetic {key} frame", timings))
    return results


def run(repeat: int, max_files: int | None, params: SpotFindingParams) -> dict:
    """All cases; returns the JSON document."""
    results: list[dict] = []
    files = sorted(DATA.glob("thau_3_2_*.cbf.bz2"))[:max_files]
    with tempfile.TemporaryDirectory(prefix="bench_analysis_") as tmp:
        folder = Path(tmp)
        if files:
            results += bench_files("thaumatin PILATUS3 6M .cbf.bz2", [(f, 0) for f in files], repeat, params)
            plain = []
            for f in files:
                target = folder / f.name.removesuffix(".bz2")
                target.write_bytes(bz2.decompress(f.read_bytes()))
                plain.append((target, 0))
            results += bench_files("thaumatin PILATUS3 6M .cbf (decompressed)", plain, repeat, params)
        else:
            print(f"warning: no thaumatin files under {DATA}", file=sys.stderr)
        frames = generate_frames(3, SyntheticSpec(detector="eiger2_16m"), seed=1, strengths=[1.0, 0.5, 0.0])
        master = write_nexus(frames, folder / "eiger16m_master.h5", frames_per_file=2)
        results += bench_files("synthetic EIGER2 16M NXmx (bslz4)", [(master, i) for i in range(3)], repeat, params)
        results += bench_generation(repeat)
    return {
        "benchmark": "bench_analysis",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "params": {"backend": params.backend, "threshold": params.threshold_algorithm},
        "repeat": repeat,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="passes over every image (default 3)")
    parser.add_argument("--files", type=int, default=None, help="use only the first N thaumatin files")
    parser.add_argument("--backend", choices=("numba", "numpy"), default="numba")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = run(args.repeat, args.files, SpotFindingParams(backend=args.backend))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'case':58} {'median':>9} {'min':>9} {'max':>9} {'n':>4}")
        for row in report["results"]:
            print(f"{row['case']:58} {row['median_s'] * 1e3:7.1f}ms {row['min_s'] * 1e3:7.1f}ms "
                  f"{row['max_s'] * 1e3:7.1f}ms {row['n']:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
