"""Kafka failures of the producers as one-line errors for people, not tracebacks."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import KafkaException

from beamstream.errors import BeamstreamError
from beamstream.platform.retained import RetainedError
from beamstream.platform.settings import Settings
from beamstream.producers.events import Event, EventPublisher


class ProducerError(BeamstreamError):
    """Events could not be published (broker unreachable, topic missing, transaction failed)."""


def _reason(exc: KafkaException) -> str:
    error = exc.args[0] if exc.args else None
    return error.str() if hasattr(error, "str") else str(exc)


def open_publisher(settings: Settings) -> EventPublisher:
    """An :class:`EventPublisher`, raising :class:`ProducerError` when the cluster can't be reached."""
    try:
        return EventPublisher(settings)
    except KafkaException as exc:
        raise ProducerError(
            f"cannot start a transactional producer on Kafka at {settings.kafka_bootstrap}: {_reason(exc)} "
            "(is the cluster up? `beamstream cluster up`)"
        ) from None


def publish(publisher: EventPublisher, events: Sequence[Event]) -> int:
    """``publisher.publish(events)`` in one transaction, with Kafka failures as :class:`ProducerError`."""
    try:
        return publisher.publish(events)
    except (KafkaException, RetainedError) as exc:
        kinds = ", ".join(sorted({event.record_type for event in events}))
        reason = _reason(exc) if isinstance(exc, KafkaException) else str(exc)
        raise ProducerError(f"publishing {len(events)} {kinds} event(s) failed: {reason}") from None
