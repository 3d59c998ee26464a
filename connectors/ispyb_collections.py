"""Data collections as ISPyB knows them, and the ProcessingJobs that reprocess them.

``beamstream go`` reads a collection with :func:`read_collection` and registers
its reprocessing with :func:`add_processing_job`. :func:`create_collection`
writes the minimal chain of rows a DataCollection needs (Person, Proposal,
BLSession, DataCollectionGroup, GridInfo): what the acquisition system does in
production, and what the demo, tests and benchmarks do without one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ispyb.sqlalchemy import (
    BLSession,
    DataCollection,
    DataCollectionGroup,
    GridInfo,
    Person,
    ProcessingJob,
    ProcessingJobImageSweep,
    ProcessingJobParameter,
    Proposal,
)
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from beamstream.connectors.ispyb_mapping import RECIPE
from beamstream.errors import BeamstreamError

#: ISPyB experiment types (DataCollectionGroup.experimentType) by Beamstream's experiment type.
_GRID_TYPES = {"Mesh", "Mesh3D"}
_SERIAL_TYPES = {"Serial Fixed", "Serial Jet", "SSX-Chip", "SSX-Jet", "Still"}
_ROTATION_TYPES = {"OSC", "SAD", "MAD", "SAD - Inverse Beam", "MAD - Inverse Beam", "Helical",
                   "Collect - Multiwedge", "Multi-positional", "Characterization", "Screening", "Standard"}
#: The ISPyB experiment type written by :func:`create_collection` for each of ours.
ISPYB_EXPERIMENT_TYPES = {"grid": "Mesh", "rotation": "OSC", "serial": "Serial Fixed", "other": "Custom"}

PARAMETER_KEY_LENGTH = 80  # ProcessingJobParameter.parameterKey
PARAMETER_VALUE_LENGTH = 1024  # ProcessingJobParameter.parameterValue


class CollectionError(BeamstreamError):
    """A collection that is unknown, or that ISPyB does not describe well enough to process."""


class DatabaseError(BeamstreamError):
    """The ISPyB database could not be read or written (the message names the database error)."""


@dataclass(frozen=True)
class CollectionRecord:
    """What reprocessing needs to know of one DataCollection."""

    dcid: int
    file_template: str  # imageDirectory + fileTemplate: a '#' template or an EIGER/NeXus master file
    start_image_number: int
    number_of_images: int
    experiment_type: str  # Beamstream's: grid, rotation, serial or other
    ispyb_experiment_type: str | None
    beamline: str
    grid: dict | None  # GridScan fields for grid scans with a GridInfo row
    sample_id: int | None
    exposure_time_s: float | None
    oscillation_start_deg: float | None
    oscillation_width_deg: float | None

    @property
    def last_image_number(self) -> int:
        """Number of the collection's last image."""
        return self.start_image_number + self.number_of_images - 1


def experiment_type(ispyb_type: str | None) -> str:
    """Beamstream's experiment type for an ISPyB one (DataCollectionGroup.experimentType)."""
    if ispyb_type in _GRID_TYPES:
        return "grid"
    if ispyb_type in _SERIAL_TYPES:
        return "serial"
    if ispyb_type in _ROTATION_TYPES:
        return "rotation"
    return "other"


def _grid(conn: Connection, dcid: int, group_id: int | None, images: int) -> dict | None:
    info = GridInfo.__table__
    row = conn.execute(select(info).where(info.c.dataCollectionId == dcid).order_by(info.c.gridInfoId.desc())
                       ).mappings().first()
    if row is None and group_id is not None:
        row = conn.execute(select(info).where(info.c.dataCollectionGroupId == group_id)
                           .order_by(info.c.gridInfoId.desc())).mappings().first()
    if row is None or not row["steps_x"] or not row["steps_y"]:
        return None
    columns, rows = int(row["steps_x"]), int(row["steps_y"])
    if columns * rows != images:
        return None
    vertical = (row["orientation"] or "horizontal") == "vertical"
    return {
        "rows": rows, "columns": columns,
        "step_x_um": float(row["dx_mm"] or 0.0) * 1000.0, "step_y_um": float(row["dy_mm"] or 0.0) * 1000.0,
        "origin_x_mm": 0.0, "origin_y_mm": 0.0, "snaked": bool(row["snaked"]),
        # ISPyB's grids are drawn on the sample view: vertical ones are the orthogonal (xz) scan.
        "plane": "xz" if vertical else "xy",
    }


def read_collection(engine: Engine, dcid: int) -> CollectionRecord:
    """The DataCollection ``dcid`` with what reprocessing needs; :class:`CollectionError` if unusable."""
    dc, dcg, session = DataCollection.__table__, DataCollectionGroup.__table__, BLSession.__table__
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(dc.c.dataCollectionId, dc.c.imageDirectory, dc.c.fileTemplate, dc.c.startImageNumber,
                       dc.c.numberOfImages, dc.c.experimenttype, dc.c.BLSAMPLEID, dc.c.exposureTime,
                       dc.c.axisStart, dc.c.axisRange, dc.c.dataCollectionGroupId,
                       dcg.c.experimentType.label("groupExperimentType"), dcg.c.blSampleId,
                       session.c.beamLineName)
                .select_from(dc.outerjoin(dcg, dcg.c.dataCollectionGroupId == dc.c.dataCollectionGroupId)
                             .outerjoin(session, session.c.sessionId == dcg.c.sessionId))
                .where(dc.c.dataCollectionId == dcid)
            ).mappings().first()
            if row is None:
                raise CollectionError(f"no data collection {dcid} in ISPyB")
            if not row["fileTemplate"]:
                raise CollectionError(f"data collection {dcid} has no file template in ISPyB")
            images = row["numberOfImages"]
            if not images or images < 1:
                raise CollectionError(f"data collection {dcid} has no images (numberOfImages {images!r})")
            ispyb_type = row["groupExperimentType"] or row["experimenttype"]
            kind = experiment_type(ispyb_type)
            grid = _grid(conn, dcid, row["dataCollectionGroupId"], images) if kind == "grid" else None
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read data collection {dcid} from ISPyB: {_brief(exc)}") from None
    if kind == "grid" and grid is None:
        kind = "other"  # a grid scan without a matching GridInfo: analysed, but not centred
    return CollectionRecord(
        dcid=dcid,
        file_template=os.path.join(row["imageDirectory"] or "", row["fileTemplate"]),
        start_image_number=row["startImageNumber"] or 1,
        number_of_images=images,
        experiment_type=kind,
        ispyb_experiment_type=ispyb_type,
        beamline=row["beamLineName"] or "",
        grid=grid,
        sample_id=row["BLSAMPLEID"] or row["blSampleId"],
        exposure_time_s=row["exposureTime"],
        oscillation_start_deg=row["axisStart"],
        oscillation_width_deg=row["axisRange"],
    )


def _brief(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]


def check_parameters(parameters: Mapping[str, str]) -> None:
    """Raise :class:`CollectionError` for parameters ISPyB's columns cannot hold."""
    for key, value in parameters.items():
        if len(key) > PARAMETER_KEY_LENGTH:
            raise CollectionError(f"parameter key {key[:20]!r}... is longer than {PARAMETER_KEY_LENGTH} characters")
        if len(value) > PARAMETER_VALUE_LENGTH:
            raise CollectionError(f"value of parameter {key!r} is longer than {PARAMETER_VALUE_LENGTH} characters")


def add_processing_job(conn: Connection, dcid: int, *, parameters: Mapping[str, str],
                       sweeps: Sequence[tuple[int, int]], display_name: str, comments: str,
                       recipe: str = RECIPE, automatic: bool = False) -> int:
    """Insert a ProcessingJob with its parameters and image sweeps on ``conn``; returns its id.

    The caller owns the transaction, so the job can be rolled back if what it was
    registered for (sending the events) fails.
    """
    check_parameters(parameters)
    job_id = conn.execute(insert(ProcessingJob.__table__).values(
        dataCollectionId=dcid, displayName=display_name, comments=comments[:255], recipe=recipe,
        automatic=1 if automatic else 0)).inserted_primary_key[0]
    if parameters:
        conn.execute(insert(ProcessingJobParameter.__table__), [
            {"processingJobId": job_id, "parameterKey": k, "parameterValue": v} for k, v in parameters.items()])
    if sweeps:
        conn.execute(insert(ProcessingJobImageSweep.__table__), [
            {"processingJobId": job_id, "dataCollectionId": dcid, "startImage": start, "endImage": end}
            for start, end in sweeps])
    return int(job_id)


def create_collection(engine: Engine, *, file_template: str, number_of_images: int, start_image_number: int = 1,
                      experiment_type: str = "rotation", grid: Mapping | None = None, beamline: str = "i03",
                      dcid: int | None = None) -> int:
    """Write a DataCollection (and the rows it hangs from) as an acquisition system would; returns its id.

    ``file_template`` is split into imageDirectory and fileTemplate as ISPyB keeps
    them; ``grid`` takes ``rows``, ``columns``, ``step_x_um``, ``step_y_um`` and ``snaked``.
    """
    directory, name = os.path.split(file_template)
    with engine.begin() as conn:
        # One demo person, proposal and visit hold every collection made here (they are unique in ISPyB).
        person = _get_or_insert(conn, Person.__table__, {"login": "beamstream"}, {"familyName": "Beamstream"})
        proposal = _get_or_insert(conn, Proposal.__table__, {"proposalCode": "cm", "proposalNumber": "1"},
                                  {"personId": person, "title": "Beamstream"})
        session = _get_or_insert(conn, BLSession.__table__, {"proposalId": proposal, "visit_number": 1},
                                 {"beamLineName": beamline})
        group = conn.execute(insert(DataCollectionGroup.__table__).values(
            sessionId=session, experimentType=ISPYB_EXPERIMENT_TYPES.get(experiment_type, "Custom"))
        ).inserted_primary_key[0]
        values = {
            "dataCollectionGroupId": group, "SESSIONID": session, "imageDirectory": directory + os.sep,
            "fileTemplate": name, "startImageNumber": start_image_number, "numberOfImages": number_of_images,
            "experimenttype": ISPYB_EXPERIMENT_TYPES.get(experiment_type, "Custom"),
        }
        if dcid is not None:
            values["dataCollectionId"] = dcid
        new_dcid = conn.execute(insert(DataCollection.__table__).values(**values)).inserted_primary_key[0]
        if grid is not None:
            conn.execute(insert(GridInfo.__table__).values(
                dataCollectionId=new_dcid, dataCollectionGroupId=group, steps_x=grid["columns"],
                steps_y=grid["rows"], dx_mm=grid["step_x_um"] / 1000.0, dy_mm=grid["step_y_um"] / 1000.0,
                snaked=1 if grid.get("snaked") else 0, orientation="horizontal"))
    return int(new_dcid)


def _get_or_insert(conn: Connection, table, match: Mapping, extra: Mapping) -> int:
    """The primary key of the row matching ``match``, inserted (with ``extra``) if there is none."""
    key = next(iter(table.primary_key.columns))
    found = conn.execute(select(key).where(*(table.c[k] == v for k, v in match.items()))).scalar()
    if found is not None:
        return int(found)
    return int(conn.execute(insert(table).values(**match, **extra)).inserted_primary_key[0])
