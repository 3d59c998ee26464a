"""``beamstream analyse``: spot finding and per-image statistics on image files, without Kafka.

Prints DIALS's per-image table (as ``dials.find_spots_server`` /
``per_image_analysis``) or, with ``--json``, one JSON object per image.
Images are numbered from 1 as in DIALS: ``series_master.h5:1`` is the first frame.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from beamstream.cli.commands.output import print_table
from beamstream.cli.params import positive_int
from beamstream.diffraction.errors import DiffractionError
from beamstream.errors import BeamstreamError

PROG = "beamstream analyse"
EXIT_USAGE = 2
TABLE_HEADERS = (
    "image",
    "#spots",
    "#spots_no_ice",
    "total_intensity",
    "d_min",
    "d_min (distl method 1)",
    "d_min (distl method 2)",
)
_SELECTION = re.compile(r"[\d\s,\-]+")

EPILOG = """\
examples:
  beamstream analyse thau_3_2_0001.cbf.bz2 thau_3_2_0002.cbf.bz2
  beamstream analyse series_master.h5:1-100 --nproc 2 --json
  beamstream analyse series_master.h5:1,5,9 --d-min 2.5

IMAGES are 1-based image numbers as in DIALS: a number (7), a range (1-10) or a
comma-separated list of both (1-3,8). Without them every image of the file is analysed.
"""


@dataclass(frozen=True)
class Job:
    """One image to analyse: file and 1-based image number."""

    path: Path
    image_number: int


def register(subparsers) -> None:
    """Add the ``analyse`` command."""
    parser = subparsers.add_parser(
        "analyse",
        help="find spots and report per-image statistics for image files (no Kafka)",
        description="Run spot finding and DIALS's per-image analysis on PILATUS CBF files (.cbf, .cbf.bz2,\n"
        ".cbf.gz) or EIGER/NeXus HDF5 master files, and print a table (or JSON lines) with the spot\n"
        "counts, total intensity and resolution estimates of every image. No Kafka involved.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="FILE[:IMAGES]", help="image file, optionally with images")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    parser.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                        help="analyse N images at once (default 1)")
    parser.add_argument("--d-min", type=float, metavar="ANGSTROM", help="ignore pixels beyond this resolution")
    parser.add_argument("--d-max", type=float, metavar="ANGSTROM", help="ignore pixels inside this resolution")
    parser.add_argument(
        "--threshold",
        choices=("dispersion", "dispersion_extended"),
        default="dispersion_extended",
        help="strong-pixel threshold algorithm (default: dispersion_extended, as DIALS)",
    )
    parser.add_argument(
        "--backend",
        choices=("numba", "numpy", "dials"),
        default="numba",
        help="spot-finding implementation (default: numba; dials needs DIALS installed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def parse_images(selection: str) -> list[int]:
    """1-based image numbers from ``"7"``, ``"1-10"`` or ``"1-3,8"`` (order kept, repeats dropped)."""
    numbers: list[int] = []
    for part in selection.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise BeamstreamError(f"bad image selection {selection!r}: use N, N-M or a comma-separated list")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if first < 1:
            raise BeamstreamError(f"bad image selection {selection!r}: image numbers start at 1")
        if last < first:
            raise BeamstreamError(f"bad image selection {selection!r}: range {part} runs backwards")
        numbers.extend(range(first, last + 1))
    return list(dict.fromkeys(numbers))


def parse_input(text: str) -> tuple[Path, list[int] | None]:
    """Split ``FILE[:IMAGES]``; a path that exists as written is never split."""
    path = Path(text)
    head, sep, tail = text.rpartition(":")
    if path.exists() or not sep or not head or not _SELECTION.fullmatch(tail):
        return path, None
    return Path(head), parse_images(tail)


def expand_jobs(inputs: list[str]) -> list[Job]:
    """Every (file, image) to analyse, checking files and image numbers before any work starts."""
    from beamstream.diffraction.readers import count_frames

    jobs: list[Job] = []
    for text in inputs:
        path, numbers = parse_input(text)
        n_images = count_frames(path)  # raises a DiffractionError naming the file if unreadable
        if numbers is None:
            numbers = list(range(1, n_images + 1))
        beyond = [n for n in numbers if n > n_images]
        if beyond:
            holds = "1 image" if n_images == 1 else f"{n_images} images (1-{n_images})"
            raise BeamstreamError(f"{path}: no image {beyond[0]}; the file holds {holds}")
        jobs.extend(Job(path, n) for n in numbers)
    return jobs


def make_params(args: argparse.Namespace):
    """SpotFindingParams from the options (raises a DiffractionError for values DIALS would reject)."""
    from beamstream.diffraction.analysis import SpotFindingParams

    if args.backend == "dials":
        from beamstream.diffraction.dials_backend import dials_available

        if not dials_available():
            raise BeamstreamError("--backend dials needs DIALS importable in this Python; use --backend numba")
    return SpotFindingParams(
        threshold_algorithm=args.threshold, d_min=args.d_min, d_max=args.d_max, backend=args.backend
    )


def analyse_job(job: Job, params) -> dict:
    """Read and analyse one image; the JSON row (also used by worker processes)."""
    from beamstream.diffraction.analysis import analyse_image
    from beamstream.diffraction.readers import open_image

    result = analyse_image(open_image(job.path, job.image_number - 1), params)
    return {"file": str(job.path), "image_number": job.image_number, **result.to_dict()}


def _analyse_sequential(jobs: list[Job], params) -> Iterator[dict]:
    """In-process analysis keeping each file open across its images."""
    from beamstream.diffraction.analysis import analyse_image
    from beamstream.diffraction.readers import open_source

    index = 0
    while index < len(jobs):
        path = jobs[index].path
        with open_source(path) as source:
            while index < len(jobs) and jobs[index].path == path:
                job = jobs[index]
                result = analyse_image(source.read(job.image_number - 1), params)
                yield {"file": str(path), "image_number": job.image_number, **result.to_dict()}
                index += 1


def _analyse_parallel(jobs: list[Job], params, nproc: int) -> Iterator[dict]:
    """Rows in input order from a pool of ``nproc`` processes.

    Workers come from a fork server (not a plain fork of this process, whose
    progress-bar and pool-manager threads make forking unsafe) that has the
    science core imported already, so each starts in a fraction of a second.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["beamstream.diffraction.analysis", "beamstream.diffraction.readers"])
    with ProcessPoolExecutor(max_workers=nproc, mp_context=context) as pool:
        futures = [pool.submit(analyse_job, job, params) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str | None:
    return None if value is None else pattern.format(value)


def table_row(row: dict, with_file: bool) -> list:
    """One line of DIALS's per-image table (resolution with its noisiness in brackets)."""
    image = f"{Path(row['file']).name}:{row['image_number']}" if with_file else row["image_number"]
    distl = []
    for method in (1, 2):
        d_min = row[f"d_min_distl_method_{method}"]
        noise = row[f"noisiness_method_{method}"]
        distl.append(None if d_min is None else f"{d_min:.2f} ({noise if noise is not None else float('nan'):.2f})")
    return [
        image,
        row["n_spots_total"],
        row["n_spots_no_ice"],
        f"{row['total_intensity']:.0f}",
        _fmt(row["estimated_d_min"]),
        *distl,
    ]


def run(args: argparse.Namespace) -> int:
    """Analyse the images; 0 on success, 2 (after a one-line message) for bad arguments or files."""
    from tqdm import tqdm

    rows: list[dict] = []
    started = time.perf_counter()
    try:
        params = make_params(args)
        jobs = expand_jobs(args.inputs)
        workers = min(args.nproc, len(jobs))
        results = _analyse_sequential(jobs, params) if workers <= 1 else _analyse_parallel(jobs, params, workers)
        # disable=None lets tqdm hide the bar when stderr is not a terminal (pipes, CI logs).
        with tqdm(total=len(jobs), unit="image", file=sys.stderr, leave=False,
                  disable=True if args.no_progress else None) as bar:
            for row in results:
                rows.append(row)
                if args.json:
                    bar.write(json.dumps(row), file=sys.stdout)  # keeps the bar intact on a terminal
                    sys.stdout.flush()
                bar.update(1)
    except (BeamstreamError, DiffractionError) as exc:
        _print_table(rows, args)  # keep what was done before the failure
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _print_table(rows, args)
    if rows and not args.no_progress and sys.stderr.isatty():
        elapsed = time.perf_counter() - started
        print(f"{len(rows)} images in {elapsed:.1f} s ({elapsed / len(rows):.3f} s per image)", file=sys.stderr)
    return 0


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """Print the table of whatever was analysed (JSON rows are already out)."""
    if rows and not args.json:
        with_file = len({row["file"] for row in rows}) > 1
        print_table([table_row(row, with_file) for row in rows], TABLE_HEADERS)


def main(argv: list[str] | None = None) -> int:
    """Run only this command (``python -m beamstream.commands.analyse``)."""
    from beamstream.cli.main import OneLineErrorParser

    parser = OneLineErrorParser(prog="beamstream")
    register(parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser))
    args = parser.parse_args(["analyse", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except BrokenPipeError:  # `... | head` closed the pipe
        return 0


if __name__ == "__main__":
    sys.exit(main())
