"""An ophyd-async detector for tests and demos: Beamstream's synthetic diffraction, a crystal at a known
motor position, written as an EIGER-style NeXus series through ophyd-async's file-writing path.

:class:`SyntheticEiger` is a ``StandardDetector`` built from the three logics ophyd-async 0.21 composes a
detector of (as its own ``SimBlobDetector``): triggering (frames per trigger, exposure), acquiring (a task
that draws and writes the frames) and data (a ``PathProvider`` says where; a ``StreamResourceDataProvider``
turns frames written into ``stream_resource`` and ``stream_datum`` documents). Each frame is drawn by
:func:`beamstream.diffraction.synthetic.generate_image` with the strength of the crystal where the motors
are at that moment, so a grid scan over it has a heat map whose centre is the crystal's position.

Files: ``<name>_data_000001.h5`` holds every frame of the series, appended in HDF5 SWMR mode (one
chunk per frame, bitshuffle-LZ4, as a DECTRIS EIGER), so a worker reads frame *n* while later ones are
still being written; ``<name>_master.h5`` (NXmx geometry, linking the data file as ``/entry/data/data_000001``)
is written with the first frame, before any frame is announced, and rewritten when the detector stops with
the series' frame count. The stream resource names the master, which is what ``ImageArrived`` carries.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.synthetic import SyntheticSpec, generate_image
from beamstream.diffraction.writers import nexus_file_names, write_master

try:  # the bluesky extra (pip install 'beamstream[bluesky]')
    from ophyd_async.core import (
        DetectorAcquireLogic,
        DetectorDataLogic,
        DetectorTriggerLogic,
        PathProvider,
        SignalR,
        StandardDetector,
        StreamableDataProvider,
        StreamResourceDataProvider,
        StreamResourceInfo,
        TriggerInfo,
        soft_signal_r_and_setter,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"the synthetic bluesky detector needs ophyd-async: pip install 'beamstream[bluesky]' ({exc})"
                      ) from None

#: Where the frames are inside the master (the DECTRIS link to the first data file).
FRAMES_DATASET = "/entry/data/data_000001"
#: Strengths below this fraction of the peak draw no crystal (as the simulator's grid crystal).
NO_CRYSTAL_BELOW = 0.05


@dataclass(frozen=True)
class CrystalPosition:
    """A crystal at a known motor position (mm): it diffracts with a 2D Gaussian strength of spread ``sigma``."""

    x_mm: float
    y_mm: float
    sigma_x_mm: float = 0.05
    sigma_y_mm: float = 0.05

    def strength(self, x_mm: float, y_mm: float) -> float:
        """How strongly the crystal diffracts with the beam at (x, y): 1 at its centre, 0 far from it."""
        value = math.exp(-0.5 * (((x_mm - self.x_mm) / self.sigma_x_mm) ** 2
                                 + ((y_mm - self.y_mm) / self.sigma_y_mm) ** 2))
        return value if value >= NO_CRYSTAL_BELOW else 0.0


class _SeriesWriter:
    """Draws the frames where the motors are and appends them to one SWMR data file of an EIGER-style series."""

    def __init__(self, spec: SyntheticSpec, crystal: CrystalPosition, x: SignalR[float], y: SignalR[float],
                 seed: int) -> None:
        self.spec, self.crystal, self.x, self.y, self.seed = spec, crystal, x, y, seed
        self.frames_written, self._set_frames_written = soft_signal_r_and_setter(int, 0)
        self.frames_per_trigger = 1
        self.master: Path | None = None
        self._handle = self._dataset = None
        self._first: DiffractionImage | None = None
        self.positions: list[tuple[float, float]] = []  # (x, y) of every frame written, for tests and demos

    def open(self, directory: Path, name: str) -> Path:
        """Start a series ``name`` in ``directory``; returns its master file (written with the first frame)."""
        self.close()
        directory.mkdir(parents=True, exist_ok=True)
        self.master = directory / f"{name}_master.h5"
        for path in (self.master, *nexus_file_names(self.master, 1)):
            if path.exists():
                raise FileExistsError(f"{path} already exists; the detector does not overwrite data")
        self._set_frames_written(0)
        self.positions = []
        return self.master

    async def acquire(self) -> None:
        """Take ``frames_per_trigger`` frames, each at the motors' position when it starts."""
        for _ in range(self.frames_per_trigger):
            x, y = await asyncio.gather(self.x.get_value(), self.y.get_value())
            index = len(self.positions)
            image = await asyncio.to_thread(
                generate_image, self.spec, seed=self.seed * 100_000 + index,
                strength=self.crystal.strength(float(x), float(y)), orientation_seed=self.seed, frame_index=index)
            await asyncio.to_thread(self._append, image)
            self.positions.append((float(x), float(y)))
            self._set_frames_written(len(self.positions))

    def _append(self, image: DiffractionImage) -> None:
        if self._dataset is None:
            self._start_series(image)
        dataset = self._dataset
        dataset.resize(dataset.shape[0] + 1, axis=0)
        dataset[-1] = np.ascontiguousarray(image.data, dtype=np.int32).view(np.uint32)  # -1/-2 as EIGER writes
        dataset.flush()  # visible to SWMR readers before the frame is announced

    def _start_series(self, first: DiffractionImage) -> None:
        import h5py
        import hdf5plugin

        assert self.master is not None, "open() first"
        data_file = nexus_file_names(self.master, 1)[0]
        handle = h5py.File(data_file, "w", libver="latest")
        group = handle.create_group("entry")
        group.attrs["NX_class"] = "NXentry"
        group = group.create_group("data")
        group.attrs["NX_class"] = "NXdata"
        shape = first.data.shape
        dataset = group.create_dataset("data", shape=(0, *shape), maxshape=(None, *shape), dtype=np.uint32,
                                       chunks=(1, *shape), **hdf5plugin.Bitshuffle(cname="lz4"))
        dataset.attrs["image_nr_low"] = np.int32(1)
        handle.swmr_mode = True  # from here on, readers see each flushed frame while the file grows
        self._handle, self._dataset, self._first = handle, dataset, first
        write_master(first, self.master, [data_file])

    def close(self) -> None:
        """End the series: close the data file; the master states the series' frame count."""
        handle, self._handle, self._dataset = self._handle, None, None
        if handle is None:
            return
        handle.close()
        if self._first is not None and self.master is not None:
            write_master(self._first, self.master, nexus_file_names(self.master, 1),
                         omega=np.zeros(len(self.positions)))


@dataclass
class _TriggerLogic(DetectorTriggerLogic):
    writer: _SeriesWriter

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        self.writer.frames_per_trigger = num

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class _AcquireLogic(DetectorAcquireLogic):
    def __init__(self, writer: _SeriesWriter) -> None:
        self.writer = writer
        self.task: asyncio.Task | None = None

    async def start_acquiring(self) -> None:
        self.task = asyncio.create_task(self.writer.acquire())

    async def wait_for_idle(self) -> None:
        if self.task is not None:
            await self.task

    async def ensure_stopped(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


class _DataLogic(DetectorDataLogic):
    def __init__(self, writer: _SeriesWriter, path_provider: PathProvider) -> None:
        self.writer, self.path_provider = writer, path_provider

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self.path_provider(datakey_name)
        master = self.writer.open(Path(info.directory_path), info.filename)
        width, height = self.writer.spec.geometry().image_size_px
        frames = StreamResourceInfo(data_key=datakey_name, shape=(height, width), chunk_shape=(1, height, width),
                                    dtype_numpy=np.dtype(np.uint32).str, parameters={"dataset": FRAMES_DATASET})
        return StreamResourceDataProvider(uri=f"{info.directory_uri}{master.name}", resources=[frames],
                                          mimetype="application/x-hdf5",
                                          collections_written_signal=self.writer.frames_written)

    async def stop(self) -> None:
        await asyncio.to_thread(self.writer.close)

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class SyntheticEiger(StandardDetector):
    """A detector writing Beamstream's synthetic diffraction of ``crystal`` where motors ``x`` and ``y``
    (their readback signals, in mm) are, as an EIGER-style NeXus series in the folders ``path_provider``
    gives. ``detector`` is a synthetic preset (the smallest, ``eiger2_1m``, by default); ``seed`` fixes the
    crystal's orientation and the noise."""

    def __init__(self, path_provider: PathProvider, x: SignalR[float], y: SignalR[float], crystal: CrystalPosition,
                 *, detector: str = "eiger2_1m", seed: int = 0, name: str = "") -> None:
        self.writer = _SeriesWriter(SyntheticSpec(detector=detector), crystal, x, y, seed)
        self.add_detector_logics(_TriggerLogic(self.writer), _AcquireLogic(self.writer),
                                 _DataLogic(self.writer, path_provider))
        super().__init__(name=name)
