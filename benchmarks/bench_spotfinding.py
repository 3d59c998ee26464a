"""Single-core spot-finding benchmark: numba vs numpy, PILATUS 6M (real) and EIGER2 16M (synthetic).

For each frame and backend it reports the median wall and CPU time of the
threshold alone and of the whole ``analyse_image`` (threshold, spots,
statistics), and the peak memory allocated during ``analyse_image`` beyond the
frame itself (tracemalloc; numpy arrays included), as a multiple of the frame's
size.

    python benchmarks/bench_spotfinding.py [--repeats 5] [--thaumatin 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

# Single core: pin thread pools before numpy/numba load.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from beamstream.diffraction.analysis import SpotFindingParams, analyse_image  # noqa: E402
from beamstream.diffraction.image import DetectorGeometry, DiffractionImage  # noqa: E402
from beamstream.diffraction.threshold import threshold_image  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thaumatin_grid"


def thaumatin_frames(count: int) -> list[tuple[str, DiffractionImage]]:
    """Up to ``count`` real PILATUS3 6M frames from the shared data, if present."""
    from beamstream.diffraction.readers import open_image

    paths = sorted(DATA_DIR.glob("thau_3_2_*.cbf.bz2"))[:count]
    return [(f"PILATUS3 6M {p.name.split('.')[0]}", open_image(p)) for p in paths]


def eiger_frame(seed: int = 1) -> tuple[str, DiffractionImage]:
    """A synthetic EIGER2 XE 16M frame (4148 x 4362), from diffraction.synthetic when available."""
    try:
        from beamstream.diffraction.synthetic import SyntheticSpec, generate_image

        return "EIGER2 16M synthetic", generate_image(SyntheticSpec(detector="eiger2_16m"), seed=seed)
    except ImportError:
        rng = np.random.default_rng(seed)
        shape = (4362, 4148)
        data = rng.poisson(1.0, size=shape).astype(np.int32)
        yy, xx = np.mgrid[-3:4, -3:4]
        stamp = np.exp(-(xx**2 + yy**2) / 2.0)
        for j, i in rng.integers(10, [shape[0] - 10, shape[1] - 10], size=(800, 2)):
            data[j - 3 : j + 4, i - 3 : i + 4] += rng.poisson(stamp * rng.uniform(20, 500))
        geometry = DetectorGeometry(
            wavelength_A=0.9686, distance_mm=200.0, beam_center_px=(2124.0, 2255.0),
            pixel_size_mm=(0.075, 0.075), image_size_px=(shape[1], shape[0]),
        )
        return "EIGER2 16M synthetic (numpy)", DiffractionImage(data, np.ones(shape, bool), geometry)


def _timed(func, repeats: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        func()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _peak_memory(func) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    func()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base


def bench(name: str, image: DiffractionImage, backend: str, repeats: int) -> dict:
    params = SpotFindingParams(backend=backend)
    analyse_image(image, params)  # JIT compile / warm caches outside the timing
    thr_wall, thr_cpu = _timed(
        lambda: threshold_image(image.data, image.mask, params.threshold_params(), backend=backend), repeats
    )
    tot_wall, tot_cpu = _timed(lambda: analyse_image(image, params), repeats)
    peak = _peak_memory(lambda: analyse_image(image, params))
    result = analyse_image(image, params)
    return {
        "frame": name,
        "shape": list(image.data.shape),
        "dtype": str(image.data.dtype),
        "backend": backend,
        "threshold_s": thr_wall,
        "threshold_cpu_s": thr_cpu,
        "total_s": tot_wall,
        "total_cpu_s": tot_cpu,
        "peak_bytes": peak,
        "peak_x_frame": peak / image.data.nbytes,
        "n_strong_pixels": result.n_strong_pixels,
        "n_spots_total": result.n_spots_total,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--numpy-repeats", type=int, default=3, help="timed runs for the slower numpy backend")
    parser.add_argument("--thaumatin", type=int, default=3, help="number of real PILATUS frames")
    parser.add_argument("--no-eiger", action="store_true", help="skip the synthetic EIGER2 16M frame")
    parser.add_argument("--backends", default="numba,numpy", help="comma-separated backends")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    frames = thaumatin_frames(args.thaumatin) if DATA_DIR.is_dir() else []
    if not args.no_eiger:
        frames.append(eiger_frame())
    rows = []
    for name, image in frames:
        for backend in args.backends.split(","):
            repeats = args.numpy_repeats if backend == "numpy" else args.repeats
            rows.append(bench(name, image, backend.strip(), repeats))

    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    header = (f"{'frame':34} {'backend':7} {'thresh s':>9} {'(cpu)':>7} {'total s':>8} {'(cpu)':>7} "
              f"{'peak MB':>8} {'x frame':>7} {'strong':>7} {'spots':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['frame']:34} {r['backend']:7} {r['threshold_s']:9.3f} {r['threshold_cpu_s']:7.3f} "
              f"{r['total_s']:8.3f} {r['total_cpu_s']:7.3f} {r['peak_bytes'] / 1e6:8.1f} "
              f"{r['peak_x_frame']:7.2f} {r['n_strong_pixels']:7d} {r['n_spots_total']:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
