"""The ISPyB database: engines, and the schema created from the ``ispyb`` package's models.

ISPyB proper is MariaDB/MySQL; SQLite is only the demo's zero-set-up default. The
``ispyb.sqlalchemy`` models are written for MySQL (TINYINT, MEDIUMINT, LONGTEXT,
``current_timestamp()`` defaults ...), so on SQLite the schema is created from a
copy of their metadata with those types compiled to SQLite's and the MySQL-only
server defaults rewritten: every ISPyB table exists on both.

Beamstream adds one table of its own, :data:`REPROCESSED_QUALITY_INDICATORS`: ISPyB's
``ImageQualityIndicators`` has the primary key (dataCollectionId, imageNumber), so a
reprocessing run could only store its per-image results there by overwriting the
live ones. The added table has the same columns, keyed by (autoProcProgramId,
imageNumber), one set of rows per processing run.
"""

from __future__ import annotations

from typing import Any

from ispyb.sqlalchemy import Base
from sqlalchemy import (
    Column,
    DateTime,
    Double,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.mysql import LONGBLOB, LONGTEXT, MEDIUMINT, MEDIUMTEXT, TINYINT
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import Computed, DefaultClause

from beamstream.errors import BeamstreamError


class DatabaseUrlError(BeamstreamError):
    """The ISPyB URL names a database Beamstream cannot use."""


#: Beamstream's extension table: per-image results of a reprocessing run (see the module doc).
extension_metadata = MetaData()
REPROCESSED_QUALITY_INDICATORS = Table(
    "ReprocessedImageQualityIndicators",
    extension_metadata,
    Column("autoProcProgramId", Integer, ForeignKey("AutoProcProgram.autoProcProgramId"), nullable=False),
    Column("imageNumber", Integer, nullable=False),
    Column("dataCollectionId", Integer, nullable=False, index=True),
    Column("spotTotal", Integer),
    Column("inResTotal", Integer),
    Column("goodBraggCandidates", Integer),
    Column("iceRings", Integer),
    Column("method1Res", Float),
    Column("method2Res", Float),
    Column("maxUnitCell", Float),
    Column("pctSaturationTop50Peaks", Float),
    Column("inResolutionOvrlSpots", Integer),
    Column("binPopCutOffMethod2Res", Float),
    Column("recordTimeStamp", DateTime),
    Column("totalIntegratedSignal", Double),
    Column("dozor_score", Double),
    Column("driftFactor", Float),
    PrimaryKeyConstraint("autoProcProgramId", "imageNumber"),
    comment="Beamstream: ImageQualityIndicators of reprocessing runs, one set per AutoProcProgram",
)

SUPPORTED_DIALECTS = ("mysql", "mariadb", "sqlite")


# -- SQLite rendering of the MySQL-specific types (only for the sqlite dialect) -------------
@compiles(TINYINT, "sqlite")
@compiles(MEDIUMINT, "sqlite")
def _sqlite_integer(type_, compiler, **kw) -> str:
    # INTEGER (not SMALLINT etc.): an INTEGER PRIMARY KEY is SQLite's autoincrementing rowid.
    return "INTEGER"


@compiles(LONGTEXT, "sqlite")
@compiles(MEDIUMTEXT, "sqlite")
def _sqlite_text(type_, compiler, **kw) -> str:
    return "TEXT"


@compiles(LONGBLOB, "sqlite")
def _sqlite_blob(type_, compiler, **kw) -> str:
    return "BLOB"


def _sqlite_default(clause: DefaultClause) -> DefaultClause | None:
    """The SQLite form of a MySQL server default, or None to drop it."""
    raw = str(getattr(clause.arg, "text", clause.arg)).strip()
    lowered = raw.lower()
    if lowered.startswith("current_timestamp"):  # incl. "... ON UPDATE current_timestamp()"
        return DefaultClause(text("CURRENT_TIMESTAMP"))
    if "(" in raw or lowered.startswith("'0000-00-00"):  # current_user() and zero dates: MySQL only
        return None
    return DefaultClause(text(raw))


def schema_metadata(dialect_name: str) -> MetaData:
    """Every ISPyB table plus Beamstream's extension, as DDL for ``dialect_name``."""
    metadata = MetaData()
    index_names: set[str] = set()
    for table in Base.metadata.sorted_tables:
        copy = table.to_metadata(metadata)
        if dialect_name == "sqlite":
            # MySQL scopes index names to their table, SQLite to the database.
            for index in copy.indexes:
                if index.name in index_names:
                    index.name = f"{copy.name}_{index.name}"
                index_names.add(index.name)
            for column in copy.columns:
                if isinstance(column.server_default, DefaultClause):
                    column.server_default = _sqlite_default(column.server_default)
                elif isinstance(column.server_default, Computed):
                    column.computed = None
                    column.server_default = None
    REPROCESSED_QUALITY_INDICATORS.to_metadata(metadata)
    return metadata


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for the ISPyB database at ``url`` (MariaDB/MySQL or SQLite).

    Connections are checked before use and time out quickly, so a database outage
    shows up as an error within seconds rather than a hang.
    """
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception as exc:  # ArgumentError for anything unparsable
        raise DatabaseUrlError(f"BEAMSTREAM_ISPYB_URL: not a database URL: {url!r} ({exc})") from None
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_DIALECTS:
        raise DatabaseUrlError(f"BEAMSTREAM_ISPYB_URL: {backend} is not supported (MariaDB/MySQL or SQLite)")
    options: dict[str, Any] = {"pool_pre_ping": True, "future": True}
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"timeout": 30}
    else:
        options["pool_recycle"] = 3600
        options["connect_args"] = {"connect_timeout": 5, "read_timeout": 60, "write_timeout": 60}
    options.update(kwargs)
    try:
        engine = create_engine(parsed, **options)
    except ImportError as exc:
        raise DatabaseUrlError(f"BEAMSTREAM_ISPYB_URL: the driver for {parsed.drivername} is missing ({exc})") from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the demo's readers look while the sink writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_schema(engine: Engine) -> list[str]:
    """Create every missing ISPyB table (and Beamstream's extension); returns the tables created.

    Existing tables are left alone, so this is safe on a production ISPyB, where it
    creates only ``ReprocessedImageQualityIndicators``.
    """
    from sqlalchemy import inspect

    metadata = schema_metadata(engine.dialect.name)
    before = set(inspect(engine).get_table_names())
    metadata.create_all(engine, checkfirst=True)
    return [t.name for t in metadata.sorted_tables if t.name not in before]
