"""Writes batches of results and summaries to ISPyB in one transaction, idempotently.

Every statement can be repeated without changing the outcome, so a batch that is
written again after a crash or a replay leaves the database as one write would:

* per-image rows are upserts on their primary key whose update is
  ``column = COALESCE(new, stored)``: a NULL never overwrites a value;
* a run's AutoProcProgram (and, for live processing, its ProcessingJob) is
  looked up by its deterministic ``jobUuid`` before one is created;
* summaries set a run's end time, status and message (the same values again on a replay).

Database errors are sorted into :class:`DatabaseUnavailable` (connection lost,
server gone, lock timeouts: wait and retry the same batch) and
:class:`DataRefused` (the database will never take this row: integrity or data
errors, e.g. a dcid or ProcessingJob that does not exist, a value out of range).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ispyb.sqlalchemy import AutoProcProgram, ImageQualityIndicators, ProcessingJob
from sqlalchemy import Table, and_, func, insert, or_, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from beamstream.connectors import ispyb_mapping as mapping
from beamstream.connectors.ispyb_schema import REPROCESSED_QUALITY_INDICATORS

IQI: Table = ImageQualityIndicators.__table__
APP: Table = AutoProcProgram.__table__
JOB: Table = ProcessingJob.__table__
REPROCESSED: Table = REPROCESSED_QUALITY_INDICATORS

RunKey = tuple[int, int | None]


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not finish the transaction; retry later."""


class DataRefused(Exception):
    """The database refuses these rows for what they contain; retrying will not help."""


def classify(exc: SQLAlchemyError) -> Exception:
    """The :class:`DataRefused` or :class:`DatabaseUnavailable` an SQLAlchemy error means."""
    detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
    if isinstance(exc, IntegrityError | DataError):
        return DataRefused(f"{type(exc).__name__}: {detail}")
    # OperationalError, InterfaceError, a missing table (ProgrammingError), a dropped
    # connection: the server or its set-up is at fault, not the row. Waiting keeps the
    # messages; an operator can fix the database and nothing is lost.
    return DatabaseUnavailable(f"{type(exc).__name__}: {detail}")


@dataclass
class WriteCounts:
    """What one :meth:`IspybWriter.write` stored."""

    live_rows: int = 0
    reprocessed_rows: int = 0
    summaries: int = 0
    programs_created: int = 0


def _upsert(dialect: str, table: Table, key: Sequence[str], columns: Sequence[str]):
    """An executemany-able INSERT that on a key clash sets each column to COALESCE(new, stored)."""
    if dialect in ("mysql", "mariadb"):
        stmt = mysql_insert(table)
        return stmt.on_duplicate_key_update({c: func.coalesce(stmt.inserted[c], table.c[c]) for c in columns})
    if dialect == "sqlite":
        stmt = sqlite_insert(table)
        return stmt.on_conflict_do_update(
            index_elements=list(key),
            set_={c: func.coalesce(stmt.excluded[c], table.c[c]) for c in columns},
        )
    raise ValueError(f"no upsert for the {dialect} dialect")


class IspybWriter:
    """Stores ImageResult and CollectionSummary values (already decoded) in ISPyB."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        columns = mapping.RESULT_COLUMNS + ("autoProcProgramId",)
        self._live_upsert = _upsert(dialect, IQI, ("dataCollectionId", "imageNumber"), columns)
        self._reprocessed_upsert = _upsert(dialect, REPROCESSED, ("autoProcProgramId", "imageNumber"),
                                           mapping.RESULT_COLUMNS + ("dataCollectionId",))
        # jobUuid -> (autoProcProgramId, processingStartTime) of runs known to be committed.
        self._programs: dict[bytes, tuple[int, datetime | None]] = {}

    def write(self, results: Sequence[dict], summaries: Sequence[dict] = ()) -> WriteCounts:
        """Store results and summaries in one transaction; raises DataRefused or DatabaseUnavailable."""
        rows = [(mapping.run_key(r), mapping.quality_indicators(r)) for r in results]
        for summary in summaries:
            mapping.check_summary(summary)
        starts: dict[RunKey, datetime | None] = {}
        for result in results:
            run, when = mapping.run_key(result), mapping.utc_naive(result.get("event_time"))
            if run not in starts or (when is not None and (starts[run] is None or when < starts[run])):
                starts[run] = when
        for summary in summaries:
            starts.setdefault(mapping.run_key(summary), None)

        counts = WriteCounts()
        try:
            with self.engine.begin() as conn:
                programs, created = self._runs(conn, starts)
                counts.programs_created = len(created)
                live, reprocessed = [], []
                for run, row in rows:
                    program_id = programs[run][0]
                    if run[1] is None:
                        live.append({**row, "autoProcProgramId": program_id})
                    else:
                        reprocessed.append({**row, "autoProcProgramId": program_id})
                if live:
                    live = mapping.merge_rows(live, ("dataCollectionId", "imageNumber"))
                    conn.execute(self._live_upsert, live)
                if reprocessed:
                    reprocessed = mapping.merge_rows(reprocessed, ("autoProcProgramId", "imageNumber"))
                    conn.execute(self._reprocessed_upsert, reprocessed)
                for summary in summaries:
                    program_id = programs[mapping.run_key(summary)][0]
                    conn.execute(update(APP).where(APP.c.autoProcProgramId == program_id)
                                 .values(**mapping.summary_values(summary)))
                counts.live_rows, counts.reprocessed_rows = len(live), len(reprocessed)
                counts.summaries = len(summaries)
        except SQLAlchemyError as exc:
            raise classify(exc) from exc
        # Only now, with the transaction committed, may the ids be remembered.
        self._programs.update(programs)
        return counts

    def _runs(self, conn: Connection, starts: dict[RunKey, datetime | None]
              ) -> tuple[dict[RunKey, tuple[int, datetime | None]], list[RunKey]]:
        """The AutoProcProgram of every run, created where missing; start times moved earlier where needed."""
        found: dict[RunKey, tuple[int, datetime | None]] = {}
        unknown = {}
        for run in starts:
            cached = self._programs.get(mapping.run_uuid(*run))
            if cached is not None:
                found[run] = cached
            else:
                unknown[mapping.run_uuid(*run)] = run
        if unknown:
            stored = conn.execute(
                select(APP.c.jobUuid, APP.c.autoProcProgramId, APP.c.processingStartTime)
                .where(APP.c.jobUuid.in_(list(unknown)))
                .order_by(APP.c.autoProcProgramId)
            ).all()
            for job_uuid, program_id, start in stored:
                found.setdefault(unknown[bytes(job_uuid)], (program_id, start))
        created = []
        for run, start in starts.items():
            if run not in found:
                found[run] = (self._create_program(conn, run, start), start)
                created.append(run)
                continue
            program_id, stored_start = found[run]
            if start is not None and (stored_start is None or start < stored_start):
                # Events of a run may come out of order across partitions and replays:
                # the start time is the earliest image seen, whichever batch brought it.
                conn.execute(update(APP).where(and_(
                    APP.c.autoProcProgramId == program_id,
                    or_(APP.c.processingStartTime.is_(None), APP.c.processingStartTime > start),
                )).values(processingStartTime=start))
                found[run] = (program_id, start)
        return found, created

    def _create_program(self, conn: Connection, run: RunKey, start: datetime | None) -> int:
        dcid, job_id = run
        values = mapping.program_values(dcid, job_id, start)
        if job_id is None:
            # Live processing has no job of its own: register one, as automatic
            # processing is registered in ISPyB, so the run is found from its collection.
            values["processingJobId"] = conn.execute(insert(JOB).values(**mapping.live_job_values(dcid))
                                                     ).inserted_primary_key[0]
        return conn.execute(insert(APP).values(**values)).inserted_primary_key[0]

    def forget(self) -> None:
        """Drop the cache of known runs (after the database was restored from a backup, say)."""
        self._programs.clear()
