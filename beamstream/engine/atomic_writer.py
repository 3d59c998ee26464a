"""Producer-side transactions: records written all or nothing, learning where each one landed
(replay, dead-letter reinjection, the producers' event batches). The commit and abort rules are
:mod:`beamstream.engine.transactions`', the limit on a stuck call (rule 5) included: given a
:class:`~beamstream.engine.transactions.CallLimit`, a commit or abort that does not return within it
raises :class:`~beamstream.engine.transactions.TransactionStuck` and the writer's producer must be
replaced by one with the same transactional id (which fences it and settles its transaction)."""

from __future__ import annotations

from confluent_kafka import KafkaException, Producer

from beamstream.engine.transactions import (
    CallLimit,
    OutRecord,
    TransactionStuck,
    abort_quietly,
    commit_producer_transaction,
)
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.retained import RetainedError
from beamstream.platform.settings import Settings

__all__ = ["AtomicWriter", "OutRecord"]


class AtomicWriter:
    """One Kafka transaction: produce records, learn where they landed, then commit, or abort on error.

    Use as a context manager; leaving the block normally commits, an exception aborts
    (nothing becomes visible to read_committed consumers).

    With ``limit``, a commit or abort that does not return within it raises :class:`TransactionStuck`
    (nothing is aborted: the producer is left to its blocked call). Whether the transaction committed
    is then unknown until a producer with the same transactional id has fenced this one; the caller
    makes that producer and treats the records as not written (publishing them again is at least once).
    Waiting for acknowledgements (:meth:`positions`) is not limited: it waits for a broker that is away.
    """

    def __init__(self, settings: Settings | None = None, transactional_id: str | None = None,
                 timeout_s: float = 60.0, producer: Producer | None = None, limit: CallLimit | None = None) -> None:
        # init_transactions fences any earlier producer with this id and completes (aborts)
        # its open transaction, so whatever is read after this sees a settled topic.
        self.producer: Producer = producer or make_producer(settings, transactional_id=transactional_id,
                                                            **{"transaction.timeout.ms": int(timeout_s * 1000)})
        self._positions: list[tuple[int, int] | None] = []
        self._errors: list[str] = []
        self._open = False
        self._limit = limit

    def __enter__(self) -> AtomicWriter:
        self.producer.begin_transaction()
        self._open = True
        return self

    def produce(self, record: OutRecord) -> int:
        """Queue one record; returns its index for :meth:`positions`."""
        index = len(self._positions)
        self._positions.append(None)

        def delivered(error, message, index=index) -> None:
            if error is not None:
                self._errors.append(f"{record.topic}: {error.str()}")
            else:
                self._positions[index] = (message.partition(), message.offset())

        kwargs = {"partition": record.partition} if record.partition is not None else {}
        while True:
            try:
                self.producer.produce(record.topic, record.value, record.key, headers=record.headers or None,
                                      on_delivery=delivered, **kwargs)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(0.5)
            except KafkaException as exc:
                raise RetainedError(f"cannot produce to {record.topic}: {exc.args[0].str()}") from None
        self.producer.poll(0)
        return index

    def positions(self, timeout: float = 60.0) -> list[tuple[int, int]]:
        """Wait for every record so far to be acknowledged; their (partition, offset), in produce order."""
        try:
            unacknowledged = self.producer.flush(timeout)
        except SystemError as exc:
            # confluent-kafka 2.16 raises SystemError out of flush() once a fatal error (fenced) is pending.
            raise RetainedError(f"the producer failed: {exc}") from None
        if unacknowledged > 0:
            raise RetainedError(f"records not acknowledged within {timeout:.0f} s")
        if self._errors:
            raise RetainedError(f"producing failed: {self._errors[0]}")
        return [p for p in self._positions if p is not None]

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._open:
            return
        self._open = False
        if exc_type is None:
            try:
                self.positions()
                commit_producer_transaction(self.producer, 60, self._limit)
                return
            except TransactionStuck as stuck:
                raise TransactionStuck(f"{stuck}; whether the transaction committed is unknown until a producer "
                                       "with its transactional id fences this one") from None
            except (KafkaException, RetainedError) as error:
                abort_quietly(self.producer, 30, self._limit)
                detail = error.args[0].str() if isinstance(error, KafkaException) else str(error)
                raise RetainedError(f"transaction aborted, nothing written: {detail}") from None
        abort_quietly(self.producer, 30, self._limit)
