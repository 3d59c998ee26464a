"""Kafka clients configured from settings: one place that knows the client options."""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Future
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from beamstream.errors import BeamstreamError
from beamstream.platform.settings import Settings


def _librdkafka_logger() -> logging.Logger:
    # librdkafka writes to stderr by default; routing it through logging keeps
    # services' structured logs in one stream and lets the CLI stay quiet.
    return logging.getLogger("beamstream.librdkafka")


def make_producer(settings: Settings, transactional_id: str | None = None, **extra: Any) -> Producer:
    """An idempotent producer (acks=all); transactional when ``transactional_id`` is given.

    A transactional producer is returned with ``init_transactions`` already done,
    which fences any older producer with the same id.
    """
    config: dict[str, Any] = {
        **settings.kafka_client_config(),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "compression.type": "lz4",
        # The Java client's partitioner: a dcid key lands on the same partition number
        # whichever client wrote it, which keeps the dcid-keyed topics co-partitioned.
        "partitioner": "murmur2_random",
        "logger": _librdkafka_logger(),
    }
    if transactional_id:
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = 60000
        # A transaction begun while the previous one's commit markers are still being written is
        # refused with CONCURRENT_TRANSACTIONS and retried after retry.backoff.ms: at the default
        # 100 ms that retry was most of the pipeline's latency (p99 at 560 Hz 287 -> 189 ms at 10 ms;
        # the backoff still grows exponentially to retry.backoff.max.ms during an outage).
        config["retry.backoff.ms"] = 10
        # ... and doubles each time up to this (librdkafka's default 1 s): back-to-back transactions of a quiet
        # stage met it as p99 spikes of 100 ms and more.
        config["retry.backoff.max.ms"] = 100
    config.update(extra)
    producer = Producer(config)
    if transactional_id:
        producer.init_transactions(30)
    return producer


def make_consumer(
    settings: Settings,
    group_id: str,
    read_committed: bool = True,
    auto_commit: bool = False,
    offset_reset: str = "earliest",
    **extra: Any,
) -> Consumer:
    """A consumer that sees only committed transactional data by default and commits manually."""
    config: dict[str, Any] = {
        **settings.kafka_client_config(),
        "group.id": group_id,
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        "enable.auto.commit": auto_commit,
        "auto.offset.reset": offset_reset,
        "logger": _librdkafka_logger(),
    }
    config.update(extra)
    return Consumer(config)


def make_admin(settings: Settings, **extra: Any) -> AdminClient:
    """An admin client for the configured cluster."""
    return AdminClient({**settings.kafka_client_config(), "logger": _librdkafka_logger(), **extra})


#: How long a command waits for the cluster to answer before saying it cannot be reached. A refused
#: connection or an unknown host is known at once; this bounds a host that never answers.
PROBE_TIMEOUT_S = 8.0


class KafkaUnreachable(BeamstreamError):
    """The cluster cannot be reached, or refused to let this client log in; the text is one line."""


def require_kafka(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Return once the cluster answers; else raise :class:`KafkaUnreachable` within about ``timeout_s``.

    Every command that talks to Kafka calls this after checking its arguments and before anything
    else connects: librdkafka clients retry an unreachable cluster until their own request times out
    (30 s and more) and narrate each attempt, where a person needs one line naming the bootstrap
    servers and what to do. A refused connection, an unknown host or a refused login is reported
    as soon as librdkafka reports it.
    """
    problem = _probe(settings, timeout_s)
    if problem is not None:
        raise KafkaUnreachable(problem)


def connection_problem(settings: Settings, exc: Exception) -> str:
    """Why a request to the cluster failed, in words: a SASL login refused says so.

    librdkafka reports a refused login only through its error callback; the failed request
    itself just says "transport failure", so a short probe asks again and listens.
    """
    text = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
    if not settings.security_protocol.startswith("SASL"):
        return text
    problem = _probe(settings, 5.0)
    return problem if problem is not None and "authentication failed" in problem else text


def _probe(settings: Settings, timeout_s: float) -> str | None:
    """None when the cluster answers a request within ``timeout_s``, else what went wrong, in one line."""
    from confluent_kafka import KafkaError

    errors: list[KafkaError] = []
    # log_level 0: the probe's findings are its return value; nothing goes to stderr or the logs.
    admin = AdminClient({**settings.kafka_client_config(), "error_cb": errors.append, "log_level": 0,
                         "socket.connection.setup.timeout.ms": int(timeout_s * 1000)})
    # Any answer will do, even a refusal (a user without the cluster Describe right): the cluster is there.
    answer = admin.describe_cluster(request_timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    final = (KafkaError._ALL_BROKERS_DOWN, KafkaError._AUTHENTICATION)
    while not answer.done() and time.monotonic() < deadline:
        admin.poll(0.05)  # serves the error callback
        if any(error.code() in final for error in errors):
            break
    for error in errors:
        if error.code() == KafkaError._AUTHENTICATION:
            return (f"authentication failed as {settings.sasl_username!r} ({settings.sasl_mechanism}) at "
                    f"{settings.kafka_bootstrap}; check BEAMSTREAM_SASL_USERNAME and the password: "
                    f"{_reason(error.str())}")
    if answer.done() and _answered(answer):
        return None
    reasons = list(dict.fromkeys(_reason(e.str()) for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN))
    why = "; ".join(reasons[:2]) or f"no answer within {timeout_s:g} s"
    if settings.uses_local_cluster:
        advice = "start the local cluster with `beamstream cluster up`, or set BEAMSTREAM_BOOTSTRAP_SERVERS"
    else:
        advice = "check that the cluster is up and that BEAMSTREAM_BOOTSTRAP_SERVERS names it"
    return f"cannot reach Kafka at {settings.kafka_bootstrap} ({why}); {advice}"


def _answered(answer: Future) -> bool:
    """Whether a finished request got an answer from the cluster (a refusal counts; a timeout does not)."""
    from confluent_kafka import KafkaError

    error = answer.exception()
    if error is None:
        return True
    code = error.args[0].code() if error.args and hasattr(error.args[0], "code") else None
    return code not in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                        KafkaError._AUTHENTICATION, KafkaError._RESOLVE)


def _reason(text: str) -> str:
    """librdkafka's error text without the broker name in front and the state timing behind.

    ``127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in
    state CONNECT)`` becomes ``Connect to ipv4#127.0.0.1:1 failed: Connection refused``.
    """
    head, sep, rest = text.partition(": ")
    if sep and "/" in head and " " not in head:
        text = rest
    return re.sub(r"\s*\(after \d+ms in state \w+[^)]*\)$", "", text).strip()
