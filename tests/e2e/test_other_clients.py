"""Other clients read our topics: Debian's ``kcat`` and Kafka's own console consumer.

A real worker in registry mode (the project's local Confluent-compatible registry, so results are
in the Confluent wire format) analyses a short collection. Then a transaction holding a copy of one
result is aborted on the results topic, as a worker's aborted batch leaves it. Read with
``isolation.level=read_committed``, kcat and the console consumer each see every result exactly once,
and each value, decoded with the registry, equals what the worker published; read_uncommitted, both
see the aborted copy too (so the log really holds it).

Debian's kcat 1.7.1 is built without Avro (``kcat -V`` lists no Avro; ``-s value=avro`` answers
"This build of kcat lacks Avro/Schema-Registry support"), so the test takes kcat's raw values,
length-prefixed with ``-f``, and decodes them with the registry serde. The console consumer prints
values' bytes as they are; they are decoded the same way.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from beamstream.operations.registry import LocalRegistry
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import Settings, load_settings
from beamstream.platform.topics import topic_name
from beamstream.producers.events import EventPublisher, collection_ended, collection_started, image_arrived
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import make_serde
from tests.helpers.harness import ServiceProcess, TopicReader
from tests.helpers.kafka_tools import console_consume
from tests.helpers.programs import require_program
from tests.helpers.registry import running_registry

pytestmark = [pytest.mark.kafka]

DCID = 7301
N_IMAGES = 6
DUPLICATED_IMAGE = 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[LocalRegistry]:
    """A running local schema registry for this module, stopped at the end."""
    with running_registry(tmp_path_factory.mktemp("registry-home")) as launcher:
        yield launcher


@pytest.fixture
def settings(kafka_settings: Settings, registry: LocalRegistry) -> Settings:
    """The test's broker and topics, in registry mode."""
    return load_settings(bootstrap_servers=kafka_settings.kafka_bootstrap, home=kafka_settings.home,
                         topic_prefix=kafka_settings.topic_prefix, image_partitions=kafka_settings.image_partitions,
                         schema_registry_url=registry.url)


@pytest.fixture
def kcat() -> str:
    """Debian's kcat, or the test fails at once with the package to install."""
    return require_program("kcat")


def kcat_consume(settings: Settings, topic: str, isolation: str) -> list[bytes]:
    """Every value of ``topic`` from the beginning as Debian's kcat reads it, up to the end of each partition.

    ``-f '%S\\n%s\\n'`` writes each value's length before its raw bytes: Avro values may hold newlines.
    """
    done = subprocess.run(
        ["kcat", "-C", "-q", "-b", settings.kafka_bootstrap, "-t", topic, "-o", "beginning", "-e",
         "-X", f"isolation.level={isolation}", "-f", "%S\n%s\n"],
        capture_output=True, timeout=60)
    assert done.returncode == 0, f"kcat exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}"
    out, values, position = done.stdout, [], 0
    while position < len(out):
        end_of_length = out.index(b"\n", position)
        length = int(out[position:end_of_length])
        start = end_of_length + 1
        values.append(out[start:start + length])
        assert out[start + length:start + length + 1] == b"\n", "kcat output out of step with its lengths"
        position = start + length + 1
    return values


def publish_collection(settings: Settings) -> None:
    """A grid-less rotation of ``N_IMAGES`` images, start to end, in one transaction."""
    with EventPublisher(settings) as publisher:
        publisher.publish([
            collection_started(DCID, file_template="/data/rot_######.cbf", number_of_images=N_IMAGES),
            *(image_arrived(DCID, n, f"/data/rot_{n:06d}.cbf") for n in range(1, N_IMAGES + 1)),
            collection_ended(DCID, N_IMAGES),
        ])


def worker_results(settings: Settings, log_dir: Path) -> dict[int, dict]:
    """The results a real worker publishes for the collection, read_committed: {image number: result}."""
    reader = TopicReader(settings, ["results"])
    worker = ServiceProcess(settings, log_dir, "worker", "--analysis", "noop", "--summary-timeout", "10",
                            "--log-level", "warning",
                            env={"BEAMSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url}).start()
    try:
        publish_collection(settings)
        reader.wait_for(lambda: len(reader.values("results", "ImageResult", DCID)) >= N_IMAGES, 60,
                        f"{N_IMAGES} results from the worker")
    finally:
        assert worker.terminate() == 0, worker.log_text()[-2000:]
        reader.close()
    results = reader.values("results", "ImageResult", DCID)
    assert len(results) == N_IMAGES
    return {result["image_number"]: result for result in results}


def abort_a_copy(settings: Settings, result: dict) -> None:
    """Write a copy of ``result`` to the results topic in a transaction, then abort it."""
    topic = topic_name(settings, "results")
    producer = make_producer(settings, transactional_id=f"{settings.topic_prefix}aborted-copy")
    producer.begin_transaction()
    producer.produce(topic, key=dcid_key(DCID), value=make_serde(settings.schema_registry_url)
                     .encode("ImageResult", result, topic))
    assert producer.flush(30) == 0  # on the log before the abort
    producer.abort_transaction(30)


def decoded_by_image(settings: Settings, values: list[bytes]) -> tuple[Counter, dict[int, dict]]:
    """How often each image number occurs among ``values``, and the decoded result of each."""
    serde, topic = make_serde(settings.schema_registry_url), topic_name(settings, "results")
    decoded = [serde.decode(value, topic, expected="ImageResult").value for value in values]
    return Counter(result["image_number"] for result in decoded), {r["image_number"]: r for r in decoded}


@pytest.mark.usefixtures("kcat")
def test_kcat_and_console_consumer_read_each_committed_result_once(settings: Settings, tmp_path: Path) -> None:
    published = worker_results(settings, tmp_path)
    abort_a_copy(settings, published[DUPLICATED_IMAGE])
    results_topic = topic_name(settings, "results")
    once = Counter(range(1, N_IMAGES + 1))
    with_aborted_copy = once + Counter([DUPLICATED_IMAGE])

    for client, read in (("kcat", kcat_consume), ("console consumer", console_consume)):
        counts, decoded = decoded_by_image(settings, read(settings, results_topic, "read_committed"))
        assert counts == once, f"{client} read_committed: {counts}"
        assert decoded == published, f"{client} decoded other values than the worker published"
        counts, _ = decoded_by_image(settings, read(settings, results_topic, "read_uncommitted"))
        assert counts == with_aborted_copy, f"{client} read_uncommitted: {counts}"
