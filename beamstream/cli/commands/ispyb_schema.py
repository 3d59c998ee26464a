"""``beamstream ispyb-schema``: create the ISPyB tables on the configured database."""

from __future__ import annotations

import argparse

from beamstream.cli.commands.output import add_json_flag, print_json
from beamstream.errors import BeamstreamError
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``ispyb-schema`` command."""
    parser = subparsers.add_parser(
        "ispyb-schema",
        help="create the ISPyB schema (from the ispyb package's models) on BEAMSTREAM_ISPYB_URL",
        description="Create every ISPyB table that is missing on the configured database (MariaDB/MySQL or "
        "SQLite), plus Beamstream's ReprocessedImageQualityIndicators. Existing tables are left alone, so "
        "on a production ISPyB only Beamstream's table is added.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    create = actions.add_parser("create", help="create the missing tables")
    add_json_flag(create)
    create.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Create the schema and say what was created."""
    from sqlalchemy.exc import SQLAlchemyError

    from beamstream.connectors.ispyb_schema import create_schema, make_engine

    engine = make_engine(load_settings().database_url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        created = create_schema(engine)
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise BeamstreamError(f"cannot create the ISPyB schema on {where}: {detail}") from None
    if args.json:
        print_json({"database": where, "created": created})
    elif created:
        print(f"created {len(created)} tables on {where}")
    else:
        print(f"ISPyB schema already complete on {where}")
    return 0
