"""ISPyB sink benchmark: sustained write rate of per-image results into MariaDB.

A local Kafka broker and a private MariaDB (``scripts/mariadb``) are started;
each run publishes N ImageResult events (20 collections, plus one summary each)
to a fresh set of topics, creates a fresh ISPyB database, then runs the sink and
times it from its first committed batch to its last. Every batch is a real
database transaction followed by a Kafka transaction committing its offsets.
The figure is the median of the runs; an unbatched run (one message per
transaction) is measured for comparison.

Run: python benchmarks/bench_ispyb.py [--json] [--quick] [--events N] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beamstream.connectors.ispyb_collections import create_collection  # noqa: E402
from beamstream.connectors.ispyb_schema import create_schema, make_engine  # noqa: E402
from beamstream.connectors.ispyb_sink import IspybSink, SinkOptions  # noqa: E402
from beamstream.operations.cluster import LocalCluster  # noqa: E402
from beamstream.platform.kafka_clients import make_producer  # noqa: E402
from beamstream.platform.settings import load_settings  # noqa: E402
from beamstream.platform.topics import apply_topics, topic_name  # noqa: E402
from beamstream.schemas.examples import example_event  # noqa: E402
from beamstream.schemas.keys import dcid_key  # noqa: E402
from beamstream.schemas.serde import make_serde  # noqa: E402
from tests.helpers.harness import free_port_pair  # noqa: E402

COLLECTIONS = 20


def start_mariadb(directory: Path) -> tuple[str, int]:
    port = free_port_pair()
    done = subprocess.run([str(ROOT / "scripts" / "mariadb"), "start", "--dir", str(directory), "--port", str(port)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"bench_ispyb: scripts/mariadb start failed: {done.stderr.strip()}")
    return done.stdout.strip(), port


def stop_mariadb(directory: Path, port: int) -> None:
    subprocess.run([str(ROOT / "scripts" / "mariadb"), "stop", "--dir", str(directory), "--port", str(port)],
                   capture_output=True, text=True, timeout=300)


def fresh_database(server_url: str):
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ispyb_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    admin.dispose()
    engine = make_engine(make_url(server_url).set(database=name).render_as_string(hide_password=False))
    create_schema(engine)
    return engine


def publish_results(settings, dcids: list[int], events: int) -> None:
    serde = make_serde()
    results, summaries = topic_name(settings, "results"), topic_name(settings, "summaries")
    producer = make_producer(settings, **{"linger.ms": 20, "batch.num.messages": 10000})
    per = events // len(dcids)
    value = example_event("ImageResult")
    for dcid in dcids:
        for image in range(1, per + 1):
            value.update(dcid=dcid, image_number=image, n_spots_total=image % 400, n_spots_no_ice=image % 300,
                         n_spots_4A=image % 200, total_intensity=float(image * 10),
                         d_min_distl_method_1=1.5 + (image % 50) / 10, d_min_distl_method_2=1.6 + (image % 50) / 10)
            producer.produce(results, serde.encode("ImageResult", value, results), dcid_key(dcid))
            if image % 5000 == 0:
                producer.poll(0)
        done = example_event("CollectionSummary")
        done.update(dcid=dcid, images_expected=per, images_analysed=per, xray_centre=None, heat_map=[])
        producer.produce(summaries, serde.encode("CollectionSummary", done, summaries), dcid_key(dcid))
    producer.flush(60)


def run_once(base, server_url: str, events: int, batch_size: int) -> dict:
    settings = load_settings(bootstrap_servers=base.kafka_bootstrap, home=base.home,
                             topic_prefix=f"b{uuid.uuid4().hex[:8]}.", image_partitions=12)
    apply_topics(settings)
    engine = fresh_database(server_url)
    dcids = [create_collection(engine, file_template=f"/data/bench/c{i}/x_#####.cbf",
                               number_of_images=events // COLLECTIONS) for i in range(COLLECTIONS)]
    publish_results(settings, dcids, events)

    sink = IspybSink(settings, engine, SinkOptions(batch_size=batch_size, report_every_s=3600))
    commits: list[tuple[float, int]] = []  # (time, result messages in the batch) after each database commit
    summaries = [0]

    def record(messages) -> None:
        commits.append((time.perf_counter(), sum(1 for m in messages if m.topic() == sink.results_topic)))
        summaries[0] += sum(1 for m in messages if m.topic() == sink.summaries_topic)
        if sum(n for _, n in commits) >= events and summaries[0] >= COLLECTIONS:
            sink.stop_event.set()

    sink.after_database_commit = record
    started = time.perf_counter()
    thread = threading.Thread(target=sink.run, kwargs={"idle_timeout_s": 30}, daemon=True)
    thread.start()
    thread.join(1800)
    total = time.perf_counter() - started
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM ImageQualityIndicators")).scalar()
        closed = conn.execute(text("SELECT count(*) FROM AutoProcProgram WHERE processingStatus = 1")).scalar()
    engine.dispose()
    if rows != events:
        raise SystemExit(f"bench_ispyb: expected {events} rows, found {rows}")
    # Steady state: from the first batch's commit to the last result's, excluding the first batch itself.
    (t_first, n_first), t_last = commits[0], max(t for t, n in commits if n)
    steady = (events - n_first) / (t_last - t_first) if t_last > t_first else float("nan")
    return {"events": events, "batch_size": batch_size, "batches": len(commits), "rows": rows,
            "programs_closed": closed, "seconds_total": round(total, 2),
            "rows_per_s": round(steady, 1), "rows_per_s_with_startup": round(events / total, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--quick", action="store_true", help="fewer events (a smoke test of the benchmark)")
    parser.add_argument("--events", type=int, default=20000, help="ImageResult events per run (default 20000)")
    parser.add_argument("--runs", type=int, default=3, help="batched runs; the median is reported (default 3)")
    parser.add_argument("--batch-size", type=int, default=500, help="sink batch size (default 500)")
    args = parser.parse_args()
    # librdkafka narrates transient broker states (coordinator loading) as warnings.
    logging.getLogger("beamstream.librdkafka").setLevel(logging.ERROR)
    events = 4000 if args.quick else args.events
    events -= events % COLLECTIONS
    with tempfile.TemporaryDirectory(prefix="bench-ispyb-") as tmp:
        tmp_path = Path(tmp)
        base = load_settings(home=tmp_path / "home", local_kafka_port=free_port_pair())
        cluster = LocalCluster(base)
        cluster.up(progress=False)
        url, port = start_mariadb(tmp_path / "mariadb")
        try:
            batched = [run_once(base, url, events, args.batch_size) for _ in range(args.runs)]
            unbatched = run_once(base, url, min(events, 1000), 1)
        finally:
            stop_mariadb(tmp_path / "mariadb", port)
            cluster.down()
    report = {
        "database": "MariaDB (scripts/mariadb, InnoDB, default durability)",
        "median_rows_per_s": statistics.median(r["rows_per_s"] for r in batched),
        "runs": batched,
        "unbatched": unbatched,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"ISPyB sink into MariaDB, {events} ImageResult events per run, batches of {args.batch_size}")
        for row in batched:
            print(f"  {row['rows_per_s']:9.1f} rows/s steady  ({row['rows_per_s_with_startup']:.1f} with start-up, "
                  f"{row['batches']} batches, {row['seconds_total']} s)")
        print(f"  median {report['median_rows_per_s']:.1f} rows/s")
        print(f"  unbatched (1 message per transaction): {unbatched['rows_per_s']:.1f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
