"""Kafka's own command-line tools (the console consumer) on the jars the local cluster launcher fetches.

Since Kafka 3.7 the console consumer lives in the ``kafka-tools`` jar
(``org.apache.kafka.tools.consumer.ConsoleConsumer``), which the broker does not need and
``kafka-artifacts.json`` therefore does not pin. It is pinned here (the checksum Maven Central
publishes next to it) and fetched, like the broker's jars, into ``<cache>/maven``; the rest of the
classpath is the launcher's own. Nothing in the product imports this module.
"""

from __future__ import annotations

import os
import subprocess
import uuid

from beamstream.operations.artifacts import Artifact, fetch_artifacts
from beamstream.operations.cluster import LocalCluster, find_java
from beamstream.platform.settings import Settings

CONSOLE_CONSUMER = "org.apache.kafka.tools.consumer.ConsoleConsumer"
KAFKA_TOOLS = Artifact("org.apache.kafka", "kafka-tools", "3.9.2",
                       "3e6844711c3f5c9148f76ac96dfbf1de0aeeba11249e142e084b6de68e0ed05e", 456157)


def kafka_tools_classpath(settings: Settings) -> str:
    """The launcher's Kafka jars plus ``kafka-tools``, fetched (checksum-verified) into the cache."""
    launcher = LocalCluster(settings)
    if launcher.kafka_version != KAFKA_TOOLS.version:
        raise AssertionError(f"kafka-tools is pinned at {KAFKA_TOOLS.version} but the launcher runs Kafka "
                             f"{launcher.kafka_version}: pin the matching kafka-tools jar here")
    jars = fetch_artifacts([*launcher.artifacts, KAFKA_TOOLS], settings.cache_dir / "maven",
                           launcher.repository, progress=False)
    return os.pathsep.join(str(jar) for jar in jars)


def console_consume(settings: Settings, topic: str, isolation: str, idle_ms: int = 4000,
                    timeout_s: float = 60.0) -> list[bytes]:
    """Every value of ``topic`` from the beginning, as Kafka's console consumer prints them.

    The consumer stops after ``idle_ms`` without a message. It writes each value's bytes as they are
    (Avro is binary, so a value may contain newlines); a random line separator splits them again.
    """
    separator = f"\n--end-of-value-{uuid.uuid4().hex}--\n"
    command = [
        find_java(), "-Xmx256m", "-XX:TieredStopAtLevel=1", "-cp", kafka_tools_classpath(settings),
        CONSOLE_CONSUMER,
        "--bootstrap-server", settings.kafka_bootstrap,
        "--topic", topic,
        "--from-beginning",
        "--timeout-ms", str(idle_ms),
        "--consumer-property", f"isolation.level={isolation}",
        "--property", f"line.separator={separator}",
    ]
    done = subprocess.run(command, capture_output=True, timeout=timeout_s)
    # It exits 0 after --timeout-ms; anything on stdout before a failure would be partial.
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")[-2000:]
        raise AssertionError(f"console consumer exited {done.returncode}: {stderr}")
    values = done.stdout.split(separator.encode())
    if values[-1] != b"":
        raise AssertionError(f"console consumer output does not end with a separator: {values[-1][:200]!r}")
    return values[:-1]
