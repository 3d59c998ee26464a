"""The detector simulator: synthetic grid scans and rotations driven through the real producers.

A simulation is what a beamline does, end to end: the acquisition system
announces ``CollectionStarted``; the detector writes files at its frame rate;
the file watcher (:mod:`producers.watcher`, in a thread) announces each image
as it becomes readable; then ``CollectionEnded``. Frames come from
:mod:`diffraction.synthetic`, are rendered ahead into a staging folder and
released by atomic rename on the detector's schedule (:mod:`producers.staging`),
so files appear complete at detector rate even when drawing a frame is slower;
the report says when rendering could not keep up.

Events go through a durable spool (:class:`~producers.publishing.SpooledPublisher`,
spool ``simulate`` unless told otherwise): a simulation runs on while Kafka is
unreachable, and at the end waits for the spool to drain (``drain_timeout_s``);
what is left is published by the next run on the spool or ``beamstream spool drain``.

Grid scans put one crystal in the grid: diffraction strength falls off as a 2D
Gaussian around a seed-chosen centre, so a heat map of spot counts has a clear
X-ray centre, returned as :attr:`SimulationReport.true_centre` to check the
pipeline's centring against.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from beamstream.diffraction.centring import GridShape
from beamstream.diffraction.detectors import PRESETS, get_preset
from beamstream.diffraction.synthetic import SyntheticSpec, generate_image
from beamstream.errors import BeamstreamError
from beamstream.platform.settings import Settings, path_within_roots
from beamstream.producers.events import collection_ended, collection_started
from beamstream.producers.publishing import Publisher, SpooledPublisher, drain_spool, open_publisher, publish
from beamstream.producers.staging import CbfStager, NexusStager, Release
from beamstream.producers.watcher import WatchReport, watch

log = logging.getLogger(__name__)

#: Smallest real EIGER2: renders fast enough for tests and interactive demos.
DEFAULT_DETECTOR = "eiger2_1m"
FORMATS = ("cbf", "nexus")
_DONE = object()
#: The beamline name simulated collections are announced with.
SIMULATED_BEAMLINE = "simulated"
#: The spool a simulation's events go through unless told otherwise.
DEFAULT_SPOOL = "simulate"

# Epoch of the time-based default dcids: keeps them below 2**32 (ISPyB's unsigned int) until ~2038.
_DCID_EPOCH = 1_735_689_600  # 2025-01-01T00:00:00Z


class SimulationError(BeamstreamError, ValueError):
    """A simulation that cannot run as asked (bad sizes, rate, detector, output folder ...)."""


@dataclass(frozen=True)
class GridCrystal:
    """Where the crystal sits in a grid scan: 0-based (row, column) centre, spread and per-position strength."""

    rows: int
    columns: int
    centre: tuple[float, float]
    sigma: tuple[float, float]
    strengths: tuple[tuple[float, ...], ...]  # [row][column], in [0, 1]


@dataclass
class SimulationReport:
    """What a simulation produced: the collection, its files, the truth to check against, and timings."""

    dcid: int
    experiment_type: str
    detector: str
    format: str
    file_template: str
    out_dir: str
    images: int
    rate_hz: float
    seed: int
    emitted: int = 0
    missing: list[int] = field(default_factory=list)
    #: ``success``, ``incomplete`` (images never announced) or ``aborted`` (stopped).
    status: str = "success"
    files: list[str] = field(default_factory=list)
    grid: dict | None = None
    #: Grid scans: the crystal's true centre, (row, column), 0-based grid units.
    true_centre: tuple[float, float] | None = None
    strengths: list[list[float]] | None = None
    timings: dict = field(default_factory=dict)
    #: A sentence when rendering could not keep up with the rate, else None.
    render_warning: str | None = None
    #: The spool's backlog when the simulation ended (see spool.Backlog): events not yet in Kafka.
    spool: dict | None = None

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def detector_key(name: str) -> str:
    """The preset key for a detector name as people type it (``eiger2-4m`` -> ``eiger2_4m``)."""
    key = name.strip().lower().replace("-", "_")
    if key not in PRESETS:
        names = ", ".join(k.replace("_", "-") for k in PRESETS)
        raise SimulationError(f"unknown detector {name!r}; choose one of {names}")
    return key


def default_dcid() -> int:
    """A time-based, unique-enough dcid (tenths of a second since 2025), below ISPyB's 2**32 limit."""
    return int((time.time() - _DCID_EPOCH) * 10)


def grid_crystal(rows: int, columns: int, seed: int = 0) -> GridCrystal:
    """A crystal for a rows x columns grid: a 2D Gaussian of strength around a seed-chosen centre.

    The centre keeps away from the edges (middle 40 % of each axis) so the
    region above half the peak is not cut by the grid, which would bias a
    centre of mass; strengths below 5 % are zero (no crystal there).
    """
    if rows < 1 or columns < 1:
        raise SimulationError(f"a grid needs at least one row and one column, got {rows}x{columns}")
    rng = np.random.default_rng([seed, 0xC7])
    centre = tuple(float(rng.uniform(0.3, 0.7) * (n - 1)) for n in (rows, columns))
    sigma = tuple(max(0.6, 0.18 * n) for n in (rows, columns))
    r = np.arange(rows, dtype=float)[:, None]
    c = np.arange(columns, dtype=float)[None, :]
    strength = np.exp(-0.5 * (((r - centre[0]) / sigma[0]) ** 2 + ((c - centre[1]) / sigma[1]) ** 2))
    strength[strength < 0.05] = 0.0
    return GridCrystal(rows, columns, (round(centre[0], 4), round(centre[1], 4)), sigma,
                       tuple(tuple(round(float(v), 6) for v in row) for row in strength))


@dataclass(frozen=True)
class _Plan:
    """One collection to simulate: what CollectionStarted says and how to draw each frame."""

    experiment_type: str
    prefix: str
    strengths: list[float]  # per frame, acquisition order
    grid: dict | None = None
    crystal: GridCrystal | None = None
    oscillation: tuple[float, float] | None = None  # (start, width) in degrees, rotations


@dataclass(frozen=True)
class _Options:
    settings: Settings
    rate_hz: float
    detector: str
    fmt: str
    out_dir: Path
    seed: int
    dcid: int
    frames_per_file: int
    prerender: bool
    watch_grace_s: float
    poll_s: float
    stop: threading.Event | None
    on_progress: Callable[[int], None] | None
    publisher: Publisher | None = None
    spool: str = DEFAULT_SPOOL
    drain_timeout_s: float | None = 120.0


def simulate_gridscan(
    settings: Settings,
    rows: int,
    cols: int,
    rate_hz: float,
    *,
    detector: str = DEFAULT_DETECTOR,
    fmt: str | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    dcid: int | None = None,
    step_um: float = 20.0,
    frames_per_file: int = 10,
    prerender: bool = False,
    watch_grace_s: float = 10.0,
    poll_s: float = 0.05,
    stop: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    publisher: Publisher | None = None,
    spool: str = DEFAULT_SPOOL,
    drain_timeout_s: float | None = 120.0,
) -> SimulationReport:
    """Simulate a snaked rows x cols grid scan at ``rate_hz`` through the real producers.

    ``fmt`` is ``cbf`` or ``nexus`` (default: what the detector writes);
    ``out_dir`` defaults to ``settings.home / "simulated"``; ``dcid`` to a
    time-based number. ``stop`` ends it early (status ``aborted``);
    ``on_progress(n)`` is called with each batch of n images announced. The report's
    ``true_centre`` is the crystal centre (row, column) in 0-based grid units.

    Events go to ``publisher`` (left open for the caller to close), else through a
    :class:`~producers.publishing.SpooledPublisher` on spool ``spool`` (None: straight to
    Kafka, which must then be reachable), drained for up to ``drain_timeout_s`` at the end
    (None: until drained or ``stop``); the report's ``spool`` says what is left.
    """
    if rows < 1 or cols < 1:
        raise SimulationError(f"a grid needs at least one row and one column, got {rows}x{cols}")
    if not step_um > 0:
        raise SimulationError(f"grid step must be positive, got {step_um}")
    crystal = grid_crystal(rows, cols, seed)
    shape = GridShape(rows, cols, snaked=True)
    strengths = []
    for index in range(rows * cols):
        row, column = shape.position(index)  # snaked: odd rows run backwards
        strengths.append(crystal.strengths[row][column])
    grid = {"rows": rows, "columns": cols, "step_x_um": float(step_um), "step_y_um": float(step_um),
            "origin_x_mm": 0.0, "origin_y_mm": 0.0, "snaked": True, "plane": "xy"}
    plan = _Plan("grid", "grid", strengths, grid=grid, crystal=crystal)
    options = _options(settings, rate_hz, detector, fmt, out_dir, seed, dcid, frames_per_file, prerender,
                       watch_grace_s, poll_s, stop, on_progress)
    return _simulate(plan, replace(options, publisher=publisher, spool=spool, drain_timeout_s=drain_timeout_s))


def simulate_rotation(
    settings: Settings,
    images: int,
    rate_hz: float,
    *,
    detector: str = DEFAULT_DETECTOR,
    fmt: str | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    dcid: int | None = None,
    oscillation_start_deg: float = 0.0,
    oscillation_width_deg: float = 0.1,
    frames_per_file: int = 100,
    prerender: bool = False,
    watch_grace_s: float = 10.0,
    poll_s: float = 0.05,
    stop: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    publisher: Publisher | None = None,
    spool: str = DEFAULT_SPOOL,
    drain_timeout_s: float | None = 120.0,
) -> SimulationReport:
    """Simulate a rotation sweep of ``images`` frames at ``rate_hz`` through the real producers.

    One crystal, fully diffracting on every frame. The frames are stills of one
    orientation (the generator does not rotate the crystal); start angle and
    width go into the CBF headers and the CollectionStarted event.
    """
    if images < 1:
        raise SimulationError(f"a rotation needs at least one image, got {images}")
    if not math.isfinite(oscillation_width_deg) or oscillation_width_deg < 0:
        raise SimulationError(f"oscillation width must be >= 0 degrees, got {oscillation_width_deg}")
    plan = _Plan("rotation", "rotation", [1.0] * images,
                 oscillation=(float(oscillation_start_deg), float(oscillation_width_deg)))
    options = _options(settings, rate_hz, detector, fmt, out_dir, seed, dcid, frames_per_file, prerender,
                       watch_grace_s, poll_s, stop, on_progress)
    return _simulate(plan, replace(options, publisher=publisher, spool=spool, drain_timeout_s=drain_timeout_s))


def _options(settings, rate_hz, detector, fmt, out_dir, seed, dcid, frames_per_file, prerender, watch_grace_s,
             poll_s, stop, on_progress) -> _Options:
    """Check the common arguments; fill in the defaults."""
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise SimulationError(f"rate must be a positive number of frames per second, got {rate_hz}")
    key = detector_key(detector)
    fmt = (fmt or get_preset(key).file_format).lower()
    if fmt not in FORMATS:
        raise SimulationError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if frames_per_file < 1:
        raise SimulationError(f"frames per file must be at least 1, got {frames_per_file}")
    if dcid is not None and dcid < 1:
        raise SimulationError(f"dcid must be a positive integer, got {dcid}")
    if poll_s <= 0 or watch_grace_s < 0:
        raise SimulationError("poll interval must be positive and the watch grace period >= 0")
    directory = Path(out_dir).expanduser() if out_dir is not None else settings.home / "simulated"
    directory = directory.absolute()  # events are read by workers with other working directories
    if not path_within_roots(str(directory), settings.data_roots):
        raise SimulationError(f"output folder {directory} is outside the configured data roots "
                              f"({', '.join(settings.data_roots)}); workers would refuse its images")
    return _Options(settings, float(rate_hz), key, fmt, directory, int(seed),
                    default_dcid() if dcid is None else int(dcid), frames_per_file, prerender, watch_grace_s,
                    poll_s, stop, on_progress)


def _detector_fields(spec: SyntheticSpec) -> dict:
    """The DetectorGeometry record of CollectionStarted, from the synthetic detector."""
    g = spec.geometry()
    return {"name": spec.preset.name, "wavelength_A": g.wavelength_A, "distance_mm": g.distance_mm,
            "beam_center_x_px": g.beam_center_px[0], "beam_center_y_px": g.beam_center_px[1],
            "pixel_size_x_mm": g.pixel_size_mm[0], "pixel_size_y_mm": g.pixel_size_mm[1],
            "width_px": g.image_size_px[0], "height_px": g.image_size_px[1]}


class _Renderer(threading.Thread):
    """Draws the frames and stages them, ahead of the release schedule; hands releases over a queue."""

    def __init__(self, plan: _Plan, spec: SyntheticSpec, seed: int, stager: CbfStager | NexusStager) -> None:
        super().__init__(name="simulator-render", daemon=True)
        self.plan, self.spec, self.seed, self.stager = plan, spec, seed, stager
        self.releases: queue.Queue = queue.Queue()
        self.halt = threading.Event()
        self.draw_s = 0.0  # time spent drawing frames
        self.busy_s = 0.0  # drawing + writing
        self.frames = 0
        self._exhausted = False  # the end marker was taken off the queue

    def _frames(self):
        for index, strength in enumerate(self.plan.strengths):
            if self.halt.is_set():
                return
            started = time.perf_counter()
            # One crystal (orientation_seed) throughout; fresh noise per frame.
            image = generate_image(self.spec, seed=self.seed * 100_000 + index, strength=strength,
                                   orientation_seed=self.seed, frame_index=index)
            if self.plan.oscillation is not None:
                start, width = self.plan.oscillation
                image.metadata["start_angle"] = start + index * width
                image.metadata["angle_increment"] = width
            self.draw_s += time.perf_counter() - started
            self.frames += 1
            yield image

    def run(self) -> None:
        started = time.perf_counter()
        try:
            for release in self.stager.stage(self._frames()):
                self.busy_s = time.perf_counter() - started
                self.releases.put(release)
                if self.halt.is_set():
                    break
        except BaseException as exc:  # handed to the releasing thread, which raises it
            self.releases.put(exc)
        finally:
            self.busy_s = time.perf_counter() - started
            self.releases.put(_DONE)

    def next_release(self, stop: threading.Event | None) -> Release | None:
        """The next staged release (None when all are done or ``stop`` is set); re-raises render errors."""
        while not self._exhausted:
            if stop is not None and stop.is_set():
                return None
            try:
                item = self.releases.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                self._exhausted = True
                return None
            if isinstance(item, BaseException):
                raise item
            return item
        return None


class _Watching:
    """The file watcher in a thread, announcing what the simulated detector releases."""

    def __init__(self, publisher: Publisher, dcid: int, template: str, images: int, options: _Options,
                 on_emitted: Callable[[int], None]) -> None:
        self.stop = threading.Event()
        self.report: WatchReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="simulator-watch", daemon=True,
                                        args=(publisher, dcid, template, images, options.poll_s, on_emitted))
        self._thread.start()

    def _run(self, publisher, dcid, template, images, poll_s: float, on_emitted) -> None:
        try:
            # No timeout: the simulator knows when the last file is out and stops the watch after a grace period.
            self.report = watch(publisher, dcid, template, images, timeout_s=None, poll_s=poll_s,
                                source="simulator", stop=self.stop, on_emitted=on_emitted)
        except BaseException as exc:
            self.error = exc

    def finish(self, grace_s: float) -> WatchReport:
        """Give the watcher ``grace_s`` to see the last files, then stop it; its report."""
        self._thread.join(grace_s)
        self.stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def _simulate(plan: _Plan, options: _Options) -> SimulationReport:
    """Run one simulated collection; see :func:`simulate_gridscan`."""
    n_images = len(plan.strengths)
    spec = SyntheticSpec(detector=options.detector, exposure_time_s=round(1.0 / options.rate_hz, 6))
    prefix = f"{plan.prefix}_{options.dcid}"
    out_dir = options.out_dir
    stager = (CbfStager(out_dir, prefix, n_images) if options.fmt == "cbf"
              else NexusStager(out_dir, prefix, n_images, options.frames_per_file))
    taken = [str(path) for path in stager.final_files if path.exists()]
    if taken:
        raise SimulationError(f"{taken[0]} already exists; choose another dcid or output folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    report = SimulationReport(
        dcid=options.dcid, experiment_type=plan.experiment_type, detector=options.detector, format=options.fmt,
        file_template=stager.file_template, out_dir=str(out_dir), images=n_images, rate_hz=options.rate_hz,
        seed=options.seed, grid=plan.grid,
        true_centre=plan.crystal.centre if plan.crystal else None,
        strengths=[list(row) for row in plan.crystal.strengths] if plan.crystal else None,
    )
    renderer = _Renderer(plan, spec, options.seed, stager)
    renderer.start()  # draw while the producer connects
    started = time.monotonic()
    publisher: Publisher | None = options.publisher
    watching: _Watching | None = None
    announced = [0]  # images announced so far, for a CollectionEnded after a failure
    collection_open = False  # started published, ended not yet

    def progress(n: int) -> None:
        announced[0] += n
        if options.on_progress is not None:
            options.on_progress(n)

    try:
        publisher = publisher or open_publisher(options.settings, spool=options.spool)
        oscillation = plan.oscillation or (0.0, 0.0)
        publish(publisher, [collection_started(
            options.dcid, file_template=stager.file_template, number_of_images=n_images,
            experiment_type=plan.experiment_type, beamline=SIMULATED_BEAMLINE, grid=plan.grid,
            detector=_detector_fields(spec), exposure_time_s=spec.exposure_time_s,
            oscillation_start_deg=oscillation[0], oscillation_width_deg=oscillation[1],
        )])
        collection_open = True
        watching = _Watching(publisher, options.dcid, stager.file_template, n_images, options, progress)
        released = _release(renderer, options, report)
        watch_report = watching.finish(options.watch_grace_s if released == n_images else 0.0)
        watching = None
        report.emitted, report.missing = watch_report.emitted, watch_report.missing
        stopped = options.stop is not None and options.stop.is_set()
        report.status = "aborted" if stopped else ("success" if not report.missing else "incomplete")
        collection_open = False
        publish(publisher, [collection_ended(options.dcid, report.emitted, report.status)])
    except BaseException:
        renderer.halt.set()
        if watching is not None:
            watching.stop.set()
            try:
                watching.finish(0.0)
            except BaseException:  # the first error is the one to report
                pass
        if publisher is not None and collection_open:
            try:  # close the collection so the pipeline does not wait for it
                publisher.publish([collection_ended(options.dcid, announced[0], "failed")])
            except Exception:
                log.warning("dcid %s: could not publish CollectionEnded after a failure", options.dcid)
        raise
    finally:
        renderer.halt.set()
        renderer.join()
        stager.cleanup()
        if publisher is not None and publisher is not options.publisher:
            report.spool = _close(publisher, options)
    report.files = [str(path) for path in stager.final_files if path.exists()]
    report.timings["total_s"] = round(time.monotonic() - started, 3)
    _render_timings(renderer, report)
    return report


def _close(publisher: Publisher, options: _Options) -> dict | None:
    """Close a publisher the simulation opened: a spool is drained first (see ``drain_timeout_s``)."""
    if not isinstance(publisher, SpooledPublisher):
        publisher.close()
        return None
    return drain_spool(publisher, options.drain_timeout_s, options.stop).as_dict()


def _release(renderer: _Renderer, options: _Options, report: SimulationReport) -> int:
    """Carry out the staged releases on the detector's schedule; returns frames released.

    Frame *i* is due at ``t0 + (i + 1) / rate`` (the end of its exposure), with
    ``t0`` set so the first staged release goes out as soon as it is ready:
    the detector starts once armed. Late releases keep the schedule (a burst
    to catch up); those more than a frame period late are counted.
    """
    rate = options.rate_hz
    pending: list[Release] = []
    first = renderer.next_release(options.stop)
    if first is None:
        return 0
    pending.append(first)
    if options.prerender:  # everything staged before the clock starts: exact timing even for slow frames
        while (item := renderer.next_release(options.stop)) is not None:
            pending.append(item)
    t0 = time.monotonic() - (first.last_index + 1) / rate
    tolerance = max(0.01, 1.0 / rate)  # within one frame period of its due time is "at rate"
    released = late = 0
    max_lag = 0.0
    first_out = last_out = None
    while True:
        release = pending.pop(0) if pending else renderer.next_release(options.stop)
        if release is None:
            break
        delay = t0 + (release.last_index + 1) / rate - time.monotonic()
        if delay > 0:
            if options.stop is not None and options.stop.wait(delay):
                break
            if options.stop is None:
                time.sleep(delay)
        elif -delay > tolerance:
            late += release.n_frames
            max_lag = max(max_lag, -delay)
        release.carry_out()
        released += release.n_frames
        last_out = time.monotonic()
        first_out = first_out or last_out
    span = (last_out - t0) if last_out is not None else 0.0
    report.timings.update({
        "released": released, "late_frames": late, "max_lag_s": round(max_lag, 3),
        "release_span_s": round(span, 3), "scheduled_span_s": round(released / rate, 3),
        "achieved_rate_hz": round(released / span, 2) if span > 0 else None,
    })
    return released


def _render_timings(renderer: _Renderer, report: SimulationReport) -> None:
    """Render speed into the report, and a warning when it could not keep up with the rate."""
    frames = max(renderer.frames, 1)
    render_hz = renderer.frames / renderer.busy_s if renderer.busy_s > 0 else None
    report.timings.update({
        "draw_s_per_frame": round(renderer.draw_s / frames, 4),
        "write_s_per_frame": round(max(renderer.busy_s - renderer.draw_s, 0.0) / frames, 4),
        "render_rate_hz": round(render_hz, 2) if render_hz else None,
    })
    late = report.timings.get("late_frames", 0)
    if late:
        report.render_warning = (
            f"rendering could not keep up with {report.rate_hz:g} Hz: {late} of {report.images} frames were "
            f"released late (up to {report.timings['max_lag_s']:.2f} s); {report.detector} renders at "
            f"{report.timings['render_rate_hz']} Hz here. Use --prerender, a lower rate or a smaller detector."
        )
        log.info("dcid %s: %s", report.dcid, report.render_warning)
