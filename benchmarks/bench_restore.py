"""Table restore benchmark: how long a worker's collections table takes to get its partitions back.

A local Kafka broker is started and a fresh set of topics applied (12 image
partitions by default, so the collections changelog has 12 partitions). The
changelog is filled with realistic ``CollectionState`` entries, encoded with
``CollectionState.to_json`` exactly as the worker's table writes them: each
collection is a started 10x10 grid scan (100 results folded in with
``apply_result``), written in several versions (by default twice: once half-way
and once complete, ended and summarised) by a transactional producer, in
transactions that each carry many collections, as the worker's commits do. The
changelog is compacted only after ``min.compaction.lag.ms`` and never in the
active segment, so a restore here reads every version written.

The timed step is building a fresh table object and calling
``restore(all partitions)`` on it (construction is inside the clock, so work a
table does when it is made still counts). It runs ``--runs`` times (default 5),
each on a new object; the median, min and max seconds are reported, with the
records the restore read (its return value) and the entries restored (outside
the clock, every collection is looked up with ``get``: each must be there, at
its last version).

Run: python benchmarks/bench_restore.py [--json] [--collections 10000] [--versions 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beamstream.engine.table import ChangelogTable  # noqa: E402
from beamstream.operations.cluster import LocalCluster  # noqa: E402
from beamstream.platform.kafka_clients import make_producer  # noqa: E402
from beamstream.platform.settings import Settings, load_settings  # noqa: E402
from beamstream.platform.topics import apply_topics, topic_name  # noqa: E402
from beamstream.streams import collection_state as cs  # noqa: E402
from tests.helpers.harness import free_port_pair  # noqa: E402

FIRST_DCID = 1_000_000
GRID_ROWS, GRID_COLUMNS = 10, 10


# -- filling the changelog -----------------------------------------------------------
def started_event(dcid: int, images: int) -> dict:
    """The fields of a CollectionStarted event that ``apply_start`` reads: a grid scan of ``images`` positions."""
    rows = max(1, images // GRID_COLUMNS)
    return {"dcid": dcid, "experiment_type": "grid", "number_of_images": images, "start_image_number": 1,
            "grid": {"rows": rows, "columns": images // rows, "step_x_um": 20.0, "step_y_um": 20.0,
                     "origin_x_mm": 0.1, "origin_y_mm": -0.2, "snaked": True, "plane": "xy"},
            "sample_id": 50_000 + dcid % 7919}


def result_event(dcid: int, image: int, rng: random.Random) -> dict:
    """The fields of an ImageResult that ``apply_result`` reads, with plausible spot counts and resolution."""
    spots = rng.choice((0, 0, 0, rng.randint(1, 40), rng.randint(40, 400)))
    d_min = round(rng.uniform(1.4, 4.5), 3) if spots else None
    return {"dcid": dcid, "image_number": image, "n_spots_no_ice": spots, "estimated_d_min": d_min}


def collection_versions(dcid: int, images: int, versions: int, now: float) -> list[bytes]:
    """The changelog values of one collection as the worker would write them: version v of ``versions`` has
    v/versions of the results folded in; the last one is complete, ended and summarised."""
    rng = random.Random(dcid)
    state = cs.CollectionState(dcid)
    cs.apply_start(state, started_event(dcid, images))
    values, done = [], 0
    for version in range(1, versions + 1):
        upto = images * version // versions
        for image in range(done + 1, upto + 1):
            cs.apply_result(state, result_event(dcid, image, rng), now=now)
        done = upto
        state.announced = state.n_seen
        if version == versions:
            cs.apply_end(state, {"event_time": now, "images_collected": images})
            state.summarized = True
        values.append(state.to_json())
    return values


def fill_changelog(settings: Settings, topic: str, partitions: int, collections: int, versions: int,
                   images: int, per_transaction: int) -> dict:
    """Write ``collections`` x ``versions`` records to ``topic`` in transactions; returns what was written.

    Collections overlap in time: the transaction that carries version 1 of one chunk of collections also
    carries version 2 of the previous chunk, and so on, so a key's versions lie in different transactions.
    A collection's partition is dcid % partitions (the worker's is its dcid key's partition: any even spread
    does for a restore).
    """
    producer = make_producer(settings, transactional_id=f"{settings.topic_prefix}bench-fill-{uuid.uuid4().hex[:8]}",
                             **{"linger.ms": 20, "batch.num.messages": 10000})
    errors: list[str] = []

    def delivered(error, _message) -> None:
        if error is not None:
            errors.append(error.str())

    dcids = list(range(FIRST_DCID, FIRST_DCID + collections))
    chunks = [dcids[i:i + per_transaction] for i in range(0, len(dcids), per_transaction)]
    pending: dict[int, list[list[bytes]]] = {}  # chunk index -> per collection, its encoded versions
    now = time.time()
    records = value_bytes = transactions = 0
    started = time.perf_counter()
    for step in range(len(chunks) + versions - 1):
        if step < len(chunks):
            pending[step] = [collection_versions(dcid, images, versions, now) for dcid in chunks[step]]
        producer.begin_transaction()
        for version in range(versions):
            index = step - version
            if index not in pending:
                continue
            for dcid, encoded in zip(chunks[index], pending[index], strict=True):
                key = cs.state_key(dcid, None).encode()
                while True:
                    try:
                        producer.produce(topic, encoded[version], key, partition=dcid % partitions,
                                         on_delivery=delivered)
                        break
                    except BufferError:
                        producer.poll(0.5)
                records += 1
                value_bytes += len(encoded[version])
            if version == versions - 1:
                del pending[index]
        producer.commit_transaction(60)
        transactions += 1
        if errors:
            raise SystemExit(f"bench_restore: writing the changelog failed: {errors[0]}")
        print(f"\rfilling changelog: {records}/{collections * versions} records, {transactions} transactions,"
              f" {time.perf_counter() - started:.1f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {"records_written": records, "transactions": transactions,
            "mean_value_bytes": round(value_bytes / max(records, 1)), "fill_s": round(time.perf_counter() - started, 1)}


# -- timing ------------------------------------------------------------------------
def time_restore(make_table: Callable[[], ChangelogTable], partitions: Iterable[int], runs: int,
                 check: Callable[[ChangelogTable], int]) -> dict:
    """Time ``make_table().restore(partitions)`` ``runs`` times, each on a fresh table object.

    Only the constructor (inside ``make_table``) and ``restore`` are inside the clock. ``check`` (outside it)
    verifies the restored table and returns how many entries it holds (required: counting needs more of the
    table than ``restore``, so the caller supplies it).
    """
    partitions = sorted(set(partitions))
    seconds, records, entries = [], [], []
    for run in range(1, runs + 1):
        started = time.perf_counter()
        table = make_table()
        loaded = table.restore(partitions)
        elapsed = time.perf_counter() - started
        seconds.append(elapsed)
        records.append(loaded)
        entries.append(check(table))
        print(f"  run {run}/{runs}: {elapsed:.3f} s, {loaded} records read, {entries[-1]} entries",
              file=sys.stderr, flush=True)
        del table
    return {"runs": runs, "median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3), "seconds": [round(s, 3) for s in seconds],
            "records_read": records[-1] if len(set(records)) == 1 else records,
            "entries_restored": entries[-1] if len(set(entries)) == 1 else entries}


def make_checker(collections: int, images: int, partitions: int) -> Callable[[ChangelogTable], int]:
    """A check that every collection came back at its last (complete) version; returns the entry count.

    It looks each collection up with ``get`` (so it needs nothing of the table beyond ``get``)."""
    def check(table: ChangelogTable) -> int:
        count = 0
        for dcid in range(FIRST_DCID, FIRST_DCID + collections):
            key = cs.state_key(dcid, None).encode()
            state = table.get(dcid % partitions, key)
            if state is None:
                raise SystemExit(f"bench_restore: {key!r} missing after the restore")
            if state.n_seen != images or not state.summarized or state.dcid != dcid:
                raise SystemExit(f"bench_restore: {key!r} restored at a stale version ({state.n_seen} images)")
            count += 1
        return count
    return check


def restore_modes(settings: Settings, topic: str, partitions: int
                  ) -> Iterator[tuple[str, Callable[[], ChangelogTable]]]:
    """The tables to time, by name: each a factory of a fresh table object over the filled changelog.

    ``changelog``: no checkpoints, every partition read from the changelog's start (the table before
    checkpoints). ``checkpoint``: a checkpoint of every partition written first (outside the clock), as a
    worker leaves one behind when its partitions are revoked or it stops; the restore reads it and the
    changelog past it.
    """
    def encoded(**options) -> ChangelogTable:
        return ChangelogTable(settings, topic, cs.CollectionState.to_json, cs.CollectionState.from_json,
                              copy_value=cs.CollectionState.copy, **options)

    yield "changelog", lambda: encoded(checkpoints=False)
    seeded = encoded()
    seeded.restore(range(partitions))
    written = seeded.checkpoint()
    print(f"checkpoints written: {written}", file=sys.stderr, flush=True)
    yield "checkpoint", encoded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--collections", type=int, default=10000, help="collections in the changelog (10000)")
    parser.add_argument("--versions", type=int, default=2,
                        help="records per collection, the last one complete (default 2: half-way and complete)")
    parser.add_argument("--images", type=int, default=100, help="results folded into each collection (100)")
    parser.add_argument("--partitions", type=int, default=12, help="image (and changelog) partitions (12)")
    parser.add_argument("--runs", type=int, default=5, help="timed restores; median, min, max reported (5)")
    parser.add_argument("--per-transaction", type=int, default=500,
                        help="collections whose versions start in each fill transaction (500)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        base = load_settings(home=Path(tmp) / "home", local_kafka_port=free_port_pair())
        cluster = LocalCluster(base)
        print("starting broker", file=sys.stderr, flush=True)
        cluster.up(progress=False)
        try:
            settings = load_settings(bootstrap_servers=base.kafka_bootstrap, home=base.home,
                                     topic_prefix=f"b{uuid.uuid4().hex[:8]}.", image_partitions=args.partitions)
            apply_topics(settings)
            topic = topic_name(settings, "workers-collections-changelog")
            fill = fill_changelog(settings, topic, args.partitions, args.collections, args.versions, args.images,
                                  args.per_transaction)
            source = Path(inspect.getsourcefile(ChangelogTable))  # which table code these figures are of
            report = {"table_source": str(source), "table_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                      "collections": args.collections, "versions": args.versions, "images": args.images,
                      "partitions": args.partitions, **fill, "restore": {}}
            check = make_checker(args.collections, args.images, args.partitions)
            for name, make_table in restore_modes(settings, topic, args.partitions):
                print(f"timing restore: {name}", file=sys.stderr, flush=True)
                report["restore"][name] = time_restore(make_table, range(args.partitions), args.runs, check)
        finally:
            cluster.down()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"table code: {report['table_source']} (sha256 {report['table_sha256'][:12]})")
        print(f"changelog: {report['collections']} collections x {report['versions']} versions"
              f" = {report['records_written']} records ({report['mean_value_bytes']} B mean value)"
              f" over {report['partitions']} partitions")
        for name, row in report["restore"].items():
            print(f"  {name:12} restore of all partitions: median {row['median_s']:.3f} s"
                  f"  (min {row['min_s']:.3f}, max {row['max_s']:.3f}, {row['runs']} runs)"
                  f"  {row['records_read']} records read, {row['entries_restored']} entries restored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
