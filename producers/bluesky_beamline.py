"""A simulated Bluesky beamline for the demo and the tests: a RunEngine, ophyd-async SimMotors ``x`` and ``y``
and the :class:`~beamstream.producers.bluesky_detector.SyntheticEiger` over a crystal at a known motor
position; and the beamline's bluesky-kafka side: its document topic and a Publisher onto it.

A grid scan of it goes through Beamstream as a real beamline's would, and ends where the beamline's plan
ends: the motors at the X-ray centre the workers found::

    beamline = simulated_beamline(data_dir, f"grid_{dcid}", crystal_at(grid_crystal(5, 6, seed), 0.02), seed=seed)
    beamline.engine.subscribe(BeamstreamCallback.open(settings))  # or document_publisher(...) and the bridge
    summary = beamline.scan_and_centre(settings, 5, 6, 0.02, dcid=dcid)
    x_mm, y_mm = beamline.where()  # == summary.centre_mm
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import make_admin
from beamstream.platform.settings import Settings
from beamstream.platform.topics import wait_until_listed
from beamstream.producers.bluesky_detector import CrystalPosition, SyntheticEiger
from beamstream.producers.bluesky_plans import Summary, grid_scan_and_centre
from beamstream.producers.simulator import GridCrystal

try:  # the bluesky extra (pip install 'beamstream[bluesky]')
    import bluesky.plan_stubs as bps
    from bluesky import RunEngine
    from ophyd_async.core import StaticFilenameProvider, StaticPathProvider, init_devices
    from ophyd_async.sim import SimMotor
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"the simulated beamline needs bluesky and ophyd-async: pip install 'beamstream[bluesky]' "
                      f"({exc})") from None


@dataclass
class SimulatedBeamline:
    """A RunEngine (``call_returns_result``: a plan's return value is ``engine(plan).plan_result``) with two
    instant simulated motors in mm and the synthetic EIGER drawing ``crystal`` where they are."""

    engine: RunEngine
    x: SimMotor
    y: SimMotor
    eiger: SyntheticEiger
    crystal: CrystalPosition

    def scan_and_centre(self, settings: Settings, rows: int, columns: int, step_mm: float, *, dcid: int,
                        timeout_s: float = 60.0, md: dict | None = None) -> Summary:
        """Run :func:`~beamstream.producers.bluesky_plans.grid_scan_and_centre`: a snaked grid of ``rows``
        along y and ``columns`` along x from (0, 0) in steps of ``step_mm``, announced as ``dcid``; returns the
        summary once the motors are at its X-ray centre. Subscribe the callback (or a Publisher) first."""
        plan = grid_scan_and_centre(settings, [self.eiger], self.y, 0.0, (rows - 1) * step_mm, rows, self.x, 0.0,
                                    (columns - 1) * step_mm, columns, dcid=dcid, timeout_s=timeout_s, md=md)
        return self.engine(plan).plan_result

    def where(self) -> tuple[float, float]:
        """The motors' positions (x, y) in mm."""
        return self.engine(bps.rd(self.x)).plan_result, self.engine(bps.rd(self.y)).plan_result


def simulated_beamline(folder: Path, name: str, crystal: CrystalPosition, *, detector: str = "eiger2_1m",
                       seed: int = 0) -> SimulatedBeamline:
    """A beamline whose detector writes series ``name`` (``<name>_master.h5`` ...) into ``folder``; ``detector``
    is a synthetic EIGER preset and ``seed`` fixes the crystal's orientation and the noise, as the simulator's."""
    # bluesky's own Ctrl-C handling, as at a beamline: once pauses at the next checkpoint, twice at once (the
    # RunEngine then raises RunEngineInterrupted; abort() ends the run). Without it Ctrl-C is swallowed.
    engine = RunEngine({}, call_returns_result=True)
    with init_devices():  # connects the devices on the RunEngine's event loop
        x = SimMotor(name="x")
        y = SimMotor(name="y")
        eiger = SyntheticEiger(StaticPathProvider(StaticFilenameProvider(name), folder), x.user_readback,
                               y.user_readback, crystal, detector=detector, seed=seed, name="eiger")
    return SimulatedBeamline(engine, x, y, eiger, crystal)


def crystal_at(crystal: GridCrystal, step_mm: float) -> CrystalPosition:
    """The simulator's grid crystal (:func:`~beamstream.producers.simulator.grid_crystal`) at its motor
    position in a grid from (0, 0) in steps of ``step_mm``: columns along x, rows along y. A scan of that grid
    sees the strengths the simulator draws."""
    (row, column), (sigma_row, sigma_column) = crystal.centre, crystal.sigma
    return CrystalPosition(x_mm=column * step_mm, y_mm=row * step_mm, sigma_x_mm=sigma_column * step_mm,
                           sigma_y_mm=sigma_row * step_mm)


def create_document_topic(settings: Settings, name: str, timeout_s: float = 30.0) -> str:
    """Create the beamline's document topic ``name`` (one partition; an existing one is kept) and wait until
    the metadata lists it: the bridge expects it to exist, and checks it at start-up."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    admin = make_admin(settings)  # kept while the future runs: a collected client cancels it
    future = admin.create_topics([NewTopic(name, 1, settings.replication_factor or -1)])[name]
    try:
        future.result(timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != exc.args[0].TOPIC_ALREADY_EXISTS:
            raise BeamstreamError(f"creating the document topic {name} failed: {exc.args[0].str()}") from None
    wait_until_listed(admin, {name}, timeout_s)
    return name


def document_publisher(settings: Settings, topic: str, key: str) -> Any:
    """bluesky-kafka's own Publisher onto ``topic``, as a beamline subscribes it to its RunEngine: every
    document keyed ``key`` (one partition: the run stays in order), flushed at each stop document."""
    from bluesky_kafka import Publisher

    config = {k: v for k, v in settings.kafka_client_config().items() if k != "bootstrap.servers"}
    return Publisher(topic=topic, bootstrap_servers=settings.kafka_bootstrap, key=key,
                     producer_config={**config, "enable.idempotence": True}, flush_on_stop_doc=True)
