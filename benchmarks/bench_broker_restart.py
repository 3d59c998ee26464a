"""How long results stop after a broker restart: the single broker SIGKILLed and started again, N times.

Two no-op workers (exactly-once, supervised: a worker that exits is started again after 1 s,
as systemd would) answer a steady 40 Hz stream of image events. Each round kills the broker
with SIGKILL (``--stop clean``: stops it cleanly) while transactions are in flight, leaves it
down for a few seconds and starts it again. The images are sent by a plain idempotent producer,
which holds them while the broker is down and delivers them when it is back, or with
``--source spool`` through a :class:`SpooledPublisher` (the file watcher's and the simulator's
way: each image a batch in the spool, published by its drain thread in transactions), so the
producer's own transactions have to get through the restart too.

Per round it reports the recovery: seconds from the broker answering again until every image
announced in the first 2 s after that has its result (read_committed), so a worker whose
transaction wedged across the restart shows as the time it took to get going again; the first
result the workers made after the broker was back (its ``result_time``); and with the spool,
the first spooled batch committed after it. It also counts the workers' exits (code 75: a
transaction stalled past the engine's limit), and checks that no image was lost or answered
twice over the whole run.

Run: python benchmarks/bench_broker_restart.py [--runs 10] [--down-s 3] [--source plain|spool]
     [--stop kill|clean] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beamstream.engine.transactions import CALL_LIMIT_S  # noqa: E402
from beamstream.operations.cluster import LocalCluster  # noqa: E402
from beamstream.platform.kafka_clients import make_producer  # noqa: E402
from beamstream.platform.settings import load_settings  # noqa: E402
from beamstream.platform.topics import apply_topics, topic_name  # noqa: E402
from beamstream.producers.events import Event, collection_started, image_arrived  # noqa: E402
from beamstream.producers.publishing import SpooledPublisher  # noqa: E402
from beamstream.schemas.serde import make_serde  # noqa: E402
from tests.helpers.harness import ServiceProcess, Supervisor, TopicReader, free_port_pair  # noqa: E402

RATE_HZ = 40.0
WINDOW_S = 2.0  # images announced this long after the broker is back must all be answered
GIVE_UP_S = 120.0


class SteadySource:
    """Announces one image every 1/RATE_HZ seconds on a plain producer; remembers when each was sent."""

    def __init__(self, settings, dcid: int, file_path: str) -> None:
        self.settings, self.dcid, self.file_path = settings, dcid, file_path
        self.sent_at: dict[int, float] = {}
        self.committed_at: list[float] = []  # when the producer's transactions committed (the spool's only)
        self._stop = threading.Event()
        self._open()
        self._send([collection_started(dcid, file_template=file_path, number_of_images=1_000_000)])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> None:
        self.serde = make_serde(self.settings.schema_registry_url)
        # No transaction: a plain idempotent producer queues through an outage without an error to handle.
        self.producer = make_producer(self.settings, **{"message.timeout.ms": 300_000, "log_level": 0})

    def _send(self, events: list[Event]) -> None:
        for event in events:
            topic = topic_name(self.settings, "images" if event.record_type == "ImageArrived" else "collections")
            self.producer.produce(topic, self.serde.encode(event.record_type, event.value, topic), event.key)
        self.producer.poll(0)

    def _run(self) -> None:
        number = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            number += 1
            self._send([image_arrived(self.dcid, number, self.file_path)])
            self.sent_at[number] = time.time()
            next_at += 1.0 / RATE_HZ
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.producer.flush(60)


class SpooledSource(SteadySource):
    """The same stream through a :class:`SpooledPublisher`: each image a spooled batch, published by the
    spool's drain thread in transactions (several batches each when it has a backlog)."""

    def __init__(self, settings, dcid: int, file_path: str, call_limit_s: float = CALL_LIMIT_S) -> None:
        self.call_limit_s = call_limit_s
        super().__init__(settings, dcid, file_path)

    def _open(self) -> None:
        self.publisher = SpooledPublisher(self.settings, "bench", directory=self.settings.home / "spool-bench",
                                          call_limit_s=self.call_limit_s)
        spool = self.publisher.spool
        ack = spool.ack

        def timed_ack(seq: int) -> None:  # called by the drain thread once a transaction has committed
            ack(seq)
            self.committed_at.append(time.time())

        spool.ack = timed_ack

    def _send(self, events: list[Event]) -> None:
        self.publisher.publish(events)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.publisher.wait_drained(GIVE_UP_S)
        self.publisher.close()


def answered(reader: TopicReader) -> Counter:
    return Counter(v["image_number"] for v in reader.values("results", "ImageResult"))


def result_times(reader: TopicReader) -> dict[int, float]:
    """First time each image's result was read."""
    times: dict[int, float] = {}
    for at, value in reader.arrivals("results", "ImageResult"):
        times.setdefault(value["image_number"], at)
    return times


def first_result_after(reader: TopicReader, since: float) -> float | None:
    """Seconds from ``since`` to the first result the workers made after it (its ``result_time``)."""
    after = [at for at in (v["result_time"].timestamp() for v in reader.values("results", "ImageResult")) if at > since]
    return min(after) - since if after else None


def run(runs: int, down_s: float, workers: int, log_root: Path | None = None, log_level: str = "warning",
        source_kind: str = "plain", stop: str = "kill", spool_call_limit_s: float = CALL_LIMIT_S) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        home = Path(tmp)
        settings = load_settings(home=home, local_kafka_port=free_port_pair())
        cluster = LocalCluster(settings)
        cluster.up(progress=False)
        settings = load_settings(bootstrap_servers=settings.kafka_bootstrap, home=home,
                                 topic_prefix=f"r{uuid.uuid4().hex[:8]}.", image_partitions=4)
        apply_topics(settings)
        log_dir = log_root or home / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        image = str(home / "image_00001.cbf")  # the no-op analysis never opens it
        procs = [ServiceProcess(settings, log_dir, f"w{i}", "--analysis", "noop", "--threads", "2",
                                "--log-level", log_level).start() for i in range(workers)]
        supervisor = Supervisor(procs)
        reader = TopicReader(settings, ["results"])
        source = (SpooledSource(settings, 7001, image, spool_call_limit_s) if source_kind == "spool"
                  else SteadySource(settings, 7001, image))
        rounds = []
        try:
            time.sleep(8)  # workers joined, paths warm
            for index in range(runs):
                time.sleep(3)
                killed = time.time()
                cluster.kill() if stop == "kill" else cluster.down()
                time.sleep(down_s)
                cluster.up(progress=False)
                back = time.time()
                how = "killed" if stop == "kill" else "stopped"
                print(f"round {index + 1}: broker {how} at {time.strftime('%H:%M:%S', time.gmtime(killed))}, "
                      f"back {back - killed:.1f} s later", file=sys.stderr, flush=True)
                time.sleep(WINDOW_S)
                window = [n for n, at in source.sent_at.copy().items() if back <= at < back + WINDOW_S]
                deadline = time.monotonic() + GIVE_UP_S
                while time.monotonic() < deadline:
                    times = result_times(reader)
                    if all(n in times for n in window):
                        break
                    time.sleep(0.1)
                times = result_times(reader)
                missing = [n for n in window if n not in times]
                recovery = max((times[n] for n in window if n in times), default=back) - back
                first = first_result_after(reader, back)
                committed = min((at for at in source.committed_at if at > back), default=None)
                rounds.append({"round": index + 1, "recovery_s": round(recovery, 2),
                               "first_result_s": None if first is None else round(first, 2),
                               "producer_s": None if committed is None else round(committed - back, 2),
                               "window_images": len(window), "unanswered": len(missing),
                               "worker_exits": len(supervisor.restarts)})
                producer = "" if committed is None else f"spool committing {committed - back:.1f} s, "
                print(f"round {index + 1}: {producer}first new result {first or 0:.1f} s, results flowing "
                      f"{recovery:.1f} s after the broker was back ({len(window)} images, {len(missing)} unanswered, "
                      f"worker exits so far {len(supervisor.restarts)})", file=sys.stderr, flush=True)
            source.stop()
            sent = len(source.sent_at)
            deadline = time.monotonic() + GIVE_UP_S
            while time.monotonic() < deadline and len(answered(reader)) < sent:
                time.sleep(0.2)
            counts = answered(reader)
        finally:
            supervisor.stop()
            for proc in procs:
                proc.retired = True
                proc.terminate()
            reader.close()
            cluster.down()
    recoveries = [r["recovery_s"] for r in rounds]
    firsts = [r["first_result_s"] for r in rounds if r["first_result_s"] is not None]
    producers = [r["producer_s"] for r in rounds if r["producer_s"] is not None]
    return {
        "runs": runs, "down_s": down_s, "workers": workers, "rate_hz": RATE_HZ, "source": source_kind, "stop": stop,
        "spool_call_limit_s": spool_call_limit_s if source_kind == "spool" else None,
        "recovery_median_s": round(statistics.median(recoveries), 2),
        "recovery_max_s": max(recoveries),
        "first_result_median_s": round(statistics.median(firsts), 2) if firsts else None,
        "producer_median_s": round(statistics.median(producers), 2) if producers else None,
        "producer_max_s": max(producers, default=None),
        "worker_exits": supervisor.restarts,
        "images_sent": sent,
        "lost": sent - len(counts),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "rounds": rounds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="broker restarts (default 10)")
    parser.add_argument("--down-s", type=float, default=3.0, help="seconds the broker stays down (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--source", choices=("plain", "spool"), default="plain",
                        help="images from a plain idempotent producer (default) or through a SpooledPublisher")
    parser.add_argument("--stop", choices=("kill", "clean"), default="kill",
                        help="SIGKILL the broker (default) or stop it cleanly")
    parser.add_argument("--spool-call-limit-s", type=float, default=CALL_LIMIT_S,
                        help=f"the spool's limit on a stuck commit or abort (default {CALL_LIMIT_S:g}; "
                             "3600 to measure without it)")
    parser.add_argument("--log-dir", type=Path, help="keep the workers' logs here (default: deleted)")
    parser.add_argument("--log-level", default="warning", help="the workers' log level (default warning)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = run(args.runs, args.down_s, args.workers, args.log_dir, args.log_level, args.source, args.stop,
                  args.spool_call_limit_s)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        producer = ("" if figures["producer_median_s"] is None else
                    f"the spool committing again after median {figures['producer_median_s']} s, "
                    f"max {figures['producer_max_s']} s; ")
        print(f"{args.runs} broker restarts ({args.stop}, {args.down_s:g} s down, images from the {args.source} "
              f"producer): {producer}first new result after median {figures['first_result_median_s']} s; "
              f"results flowing again after median {figures['recovery_median_s']} s, "
              f"max {figures['recovery_max_s']} s; "
              f"worker exits {len(figures['worker_exits'])}; images {figures['images_sent']}, "
              f"lost {figures['lost']}, duplicated {figures['duplicated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
