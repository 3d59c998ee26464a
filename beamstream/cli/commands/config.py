"""``beamstream config``: the settings in force and where each came from."""

from __future__ import annotations

import argparse
import dataclasses

from beamstream.cli.commands.output import add_json_flag, print_json, print_table
from beamstream.platform.settings import ENV_PREFIX, load_settings

SECRET_FIELDS = {"sasl_password", "dashboard_token"}


def register(subparsers) -> None:
    """Add the ``config`` command."""
    parser = subparsers.add_parser(
        "config",
        help="show the settings in force",
        description="Show every setting with its value (secrets hidden). Set them as BEAMSTREAM_<NAME> "
        "environment variables or in beamstream.toml / $BEAMSTREAM_CONFIG.",
    )
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the resolved settings."""
    settings = load_settings()
    values = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name in SECRET_FIELDS:
            value = "(set)" if value else ""
        values[field.name] = list(value) if isinstance(value, tuple) else str(value)
    values["effective_bootstrap"] = settings.kafka_bootstrap
    values["effective_database_url"] = settings.database_url
    if args.json:
        print_json(values)
    else:
        print_table([(f"{ENV_PREFIX}{k.upper()}" if not k.startswith("effective") else k, v)
                     for k, v in values.items()], ("setting", "value"))
    return 0
