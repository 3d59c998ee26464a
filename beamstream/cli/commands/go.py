"""``beamstream go``: reprocess a finished collection through the live pipeline."""

from __future__ import annotations

import argparse

from beamstream.cli.commands.output import add_json_flag, print_json
from beamstream.cli.params import dcid
from beamstream.platform.kafka_clients import require_kafka
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``go`` command."""
    parser = subparsers.add_parser(
        "go",
        help="reprocess a collection: register a ProcessingJob and replay its images",
        description="Read data collection DCID from ISPyB (file template, image range, experiment type), "
        "register a ProcessingJob with its parameters and image sweep, and publish the collection's events "
        "(started, every image, ended) carrying the job's id, as a live collection would. Workers analyse "
        "them like live images; the ISPyB sink stores the results under a new AutoProcProgram and leaves the "
        "live results untouched. The job is committed only if the events were published.",
    )
    parser.add_argument("dcid", type=dcid, metavar="DCID", help="ISPyB DataCollection id")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a ProcessingJobParameter (repeatable), e.g. --param d_min=2.0")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done; write and send nothing")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan, then (unless --dry-run) register and publish."""
    from beamstream.connectors.ispyb_schema import make_engine
    from beamstream.producers.go import parse_parameters, plan, run_go

    parameters = parse_parameters(args.param)  # bad parameters fail before the database is touched
    settings = load_settings()
    engine = make_engine(settings.database_url)
    go_plan = plan(engine, args.dcid, parameters)  # an unknown dcid is refused before Kafka is asked
    if not args.dry_run:
        require_kafka(settings)  # before the ProcessingJob is registered
    job_id = None if args.dry_run else run_go(settings, engine, go_plan)
    if args.json:
        print_json({
            "dcid": args.dcid, "dry_run": args.dry_run, "processing_job_id": job_id,
            "experiment_type": go_plan.record.experiment_type, "file_template": go_plan.record.file_template,
            "images": [go_plan.sweep[0], go_plan.sweep[1]], "parameters": parameters,
            "events": len(go_plan.frames) + 3,
        })
        return 0
    prefixes = {"ProcessingJob": "would register ", "events": "would send "} if args.dry_run else {}
    for line in go_plan.describe():
        print(prefixes.get(line.split(":")[0], "") + line)
    if args.dry_run:
        print("dry run: no ProcessingJob registered, no events sent")
    else:
        print(f"registered ProcessingJob {job_id} and sent {len(go_plan.frames) + 3} events")
    return 0
