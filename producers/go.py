"""Reprocessing a finished collection (``beamstream go``): the same events as a live collection.

The collection is read from ISPyB, a ProcessingJob is registered for it (with its
parameters and image sweep), and the collection's events — started, one
ImageArrived per image, ended — are published carrying the job's id, plus a
ProcessingRequest recording what was asked. Workers treat them exactly like a
live collection; the per-collection table keys by (dcid, processing_job_id), so
the run gets its own summary, and the ISPyB sink stores its results under its
own AutoProcProgram, leaving the live results alone.

The job is inserted in a database transaction that is committed only once the
events are published (one Kafka transaction): if publishing fails, nothing is
registered and nothing is sent.
"""

from __future__ import annotations

import getpass
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from beamstream.connectors.ispyb_collections import (
    CollectionRecord,
    DatabaseError,
    add_processing_job,
    check_parameters,
    read_collection,
)
from beamstream.connectors.ispyb_mapping import RECIPE
from beamstream.errors import BeamstreamError
from beamstream.platform.settings import Settings
from beamstream.producers.events import Event, EventPublisher, collection_ended, collection_started, image_arrived, now
from beamstream.producers.publishing import open_publisher, publish
from beamstream.producers.scanning import FrameRef, cbf_file_name, is_nexus_template

#: ProcessingJob.displayName of the jobs ``beamstream go`` registers.
GO_JOB_NAME = "beamstream go"


class GoError(BeamstreamError):
    """A reprocessing request that cannot be carried out (bad parameter, unusable collection ...)."""


def parse_parameters(items: Sequence[str]) -> dict[str, str]:
    """``key=value`` strings to a dict; a missing ``=``, an empty key or a repeated key is an error."""
    parameters: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise GoError(f"--param {item!r}: expected key=value")
        if not key:
            raise GoError(f"--param {item!r}: the key is empty")
        if key in parameters:
            raise GoError(f"--param {key!r} is given twice")
        parameters[key] = value
    check_parameters(parameters)
    return parameters


def frames(record: CollectionRecord) -> list[FrameRef]:
    """Every image of the collection: a file per image for ``#`` templates, frames of one master file else."""
    numbers = range(record.start_image_number, record.last_image_number + 1)
    if is_nexus_template(record.file_template):
        # An EIGER master file holds the whole collection; frames count from its first image.
        return [FrameRef(n, record.file_template, n - record.start_image_number) for n in numbers]
    if "#" not in record.file_template:
        raise GoError(f"data collection {record.dcid}: file template {record.file_template!r} has no '#' "
                      "for the image number and is not an EIGER/NeXus master file")
    try:
        return [FrameRef(n, str(cbf_file_name(record.file_template, n)), 0) for n in numbers]
    except ValueError as exc:  # TemplateError: '#' in the directory, several runs of '#'
        raise GoError(f"data collection {record.dcid}: {exc}") from None


@dataclass
class GoPlan:
    """What ``go`` will do for one collection."""

    record: CollectionRecord
    parameters: dict[str, str]
    frames: list[FrameRef]
    requested_by: str

    @property
    def sweep(self) -> tuple[int, int]:
        """The image sweep registered with the job (inclusive)."""
        return self.record.start_image_number, self.record.last_image_number

    def events(self, job_id: int | None) -> list[Event]:
        """The events to publish for ProcessingJob ``job_id``, in order."""
        record = self.record
        request = Event("ProcessingRequest", {
            "request_id": str(uuid.uuid4()), "kind": "reprocess", "dcid": record.dcid,
            "processing_job_id": job_id, "recipe": RECIPE, "parameters": dict(self.parameters),
            "image_ranges": [{"start": self.sweep[0], "end": self.sweep[1]}],
            "requested_by": self.requested_by, "event_time": now(),
        })
        started = collection_started(
            record.dcid, file_template=record.file_template, number_of_images=record.number_of_images,
            experiment_type=record.experiment_type, beamline=record.beamline,
            start_image_number=record.start_image_number, grid=record.grid, sample_id=record.sample_id,
            exposure_time_s=record.exposure_time_s, oscillation_start_deg=record.oscillation_start_deg,
            oscillation_width_deg=record.oscillation_width_deg, processing_job_id=job_id,
        )
        images = [image_arrived(record.dcid, f.image_number, f.file_path, f.frame_index, source="go",
                                processing_job_id=job_id) for f in self.frames]
        ended = collection_ended(record.dcid, len(self.frames), "success", processing_job_id=job_id)
        return [request, started, *images, ended]

    def describe(self) -> list[str]:
        """Human-readable lines saying what will be (or would be) done."""
        record = self.record
        grid = f" {record.grid['rows']}x{record.grid['columns']}" if record.grid else ""
        params = ", ".join(f"{k}={v}" for k, v in self.parameters.items()) or "none"
        return [
            f"collection {record.dcid}: {record.experiment_type}{grid} "
            f"(ISPyB {record.ispyb_experiment_type or 'unknown'}), images {self.sweep[0]}-{self.sweep[1]}",
            f"files: {self.frames[0].file_path} ... {self.frames[-1].file_path}",
            f"ProcessingJob: recipe {RECIPE}, parameters {params}, sweep {self.sweep[0]}-{self.sweep[1]}",
            f"events: 1 request, 1 collection started, {len(self.frames)} images, 1 collection ended",
        ]


def plan(engine: Engine, dcid: int, parameters: dict[str, str], requested_by: str | None = None) -> GoPlan:
    """Read the collection and work out the events; writes nothing."""
    if dcid < 1:
        raise GoError(f"a dcid is a positive number, got {dcid}")
    record = read_collection(engine, dcid)
    return GoPlan(record, parameters, frames(record), requested_by or _user())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run_go(settings: Settings, engine: Engine, go_plan: GoPlan, publisher: EventPublisher | None = None) -> int:
    """Register the job and publish the events, all or nothing; returns the ProcessingJob id."""
    record = go_plan.record
    owned = publisher is None
    # The producer first: its start-up should not hold the database transaction open.
    publisher = publisher or open_publisher(settings)
    try:
        with engine.begin() as conn:
            job_id = add_processing_job(
                conn, record.dcid, parameters=go_plan.parameters, sweeps=[go_plan.sweep],
                display_name=GO_JOB_NAME, comments=f"requested by {go_plan.requested_by} with beamstream go",
            )
            # A publishing failure leaves this block by an exception, which rolls the job back.
            publish(publisher, go_plan.events(job_id))
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot register the ProcessingJob for collection {record.dcid}: "
                            f"{str(getattr(exc, 'orig', None) or exc).splitlines()[0][:300]}") from None
    finally:
        if owned:
            publisher.close()
    return job_id
