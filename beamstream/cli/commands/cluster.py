"""``beamstream cluster up|down|status|logs``: the local Kafka cluster (one KRaft node, or three for failover)."""

from __future__ import annotations

import argparse
import sys
import time

from beamstream.cli.commands.output import add_json_flag, print_json, print_table
from beamstream.cli.params import positive_int
from beamstream.operations.cluster import LocalCluster
from beamstream.platform.settings import load_settings


def register(subparsers) -> None:
    """Add the ``cluster`` command."""
    parser = subparsers.add_parser(
        "cluster",
        help="run a local Apache Kafka cluster (KRaft on loopback: one node, or --brokers 3)",
        description="Start, stop and inspect the local Kafka cluster. Kafka's jars are downloaded "
        "once from Maven Central into the cache (checksums verified) and run on Java >= 17. "
        "Data is kept across down/up unless --reset. With --brokers 3, three nodes (each a broker and a "
        "controller) replicate every topic 3 times (min.insync.replicas 2), so one may fail; the count is "
        "remembered, and status, down and logs need no --brokers.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    up = actions.add_parser("up", help="start the broker (format storage on first start)")
    up.add_argument("--reset", action="store_true", help="delete all topic data before starting")
    up.add_argument("--brokers", type=int, choices=(1, 3, 5), default=None,
                    help="nodes to run (default: as formatted, else 1; changing it needs --reset)")
    add_json_flag(up)
    down = actions.add_parser("down", help="stop the broker cleanly")
    down.add_argument("--reset", action="store_true", help="also delete all topic data")
    status = actions.add_parser("status", help="is it running, where, with which data")
    add_json_flag(status)
    logs = actions.add_parser("logs", help="show the broker log")
    logs.add_argument("-n", "--lines", type=positive_int, default=50, help="how many lines (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--node", type=positive_int, default=1, help="which node's log (default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Carry out the cluster action."""
    brokers = getattr(args, "brokers", None)
    cluster = LocalCluster(load_settings(**({"local_kafka_nodes": brokers} if brokers else {})))
    if args.action == "up":
        started = time.monotonic()
        status = cluster.up(reset=args.reset)
        if args.json:
            print_json(status.as_dict())
        elif len(status.nodes) == 1:
            print(f"Kafka {status.kafka_version} is up at {status.bootstrap} (pid {status.pid}, "
                  f"{time.monotonic() - started:.1f} s); data in {status.data_dir}")
            print(cluster.client_auth_help())
        else:
            print(f"Kafka {status.kafka_version} is up on {len(status.nodes)} nodes at {status.bootstrap} "
                  f"({time.monotonic() - started:.1f} s); topics get {cluster.replicas} replicas, "
                  f"min.insync.replicas {min(2, cluster.replicas)}")
            _print_nodes(status)
            print(cluster.client_auth_help())
    elif args.action == "down":
        was_running = cluster.down(reset=args.reset)
        print("stopped" if was_running else "not running", end="")
        print("; data deleted" if args.reset else "")
    elif args.action == "status":
        status = cluster.status()
        if args.json:
            print_json(status.as_dict())
        elif len(status.nodes) == 1:
            state = f"running (pid {status.pid})" if status.running else "stopped"
            print(f"Kafka {status.kafka_version} at {status.bootstrap}: {state}\n"
                  f"data: {status.data_dir} ({'formatted' if status.formatted else 'not formatted'})\n"
                  f"log:  {status.log_file}\n"
                  f"security: {status.security}")
        else:
            print(f"Kafka {status.kafka_version}, {len(status.nodes)} nodes at {status.bootstrap}: "
                  f"{status.nodes_running} of {len(status.nodes)} running "
                  f"({'formatted' if status.formatted else 'not formatted'}); security: {status.security}")
            _print_nodes(status)
        return 0 if status.running else 3
    elif args.action == "logs":
        node = cluster.node(args.node)
        print(cluster.tail_log(args.lines, node.node_id))
        if args.follow:
            _follow(node.log_file)
    return 0


def _print_nodes(status) -> None:
    print_table([(n.node_id, f"running (pid {n.pid})" if n.running else "stopped", n.port, n.controller_port,
                  n.data_dir) for n in status.nodes], ("node", "state", "port", "controller", "data"))


def _follow(path) -> None:
    with open(path, errors="replace") as handle:
        handle.seek(0, 2)
        while True:
            line = handle.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.5)
