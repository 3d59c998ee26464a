"""Structured logs for long-running services: one JSON object per line.

Fields passed with ``extra={"dcid": ..., "image": ...}`` become top-level keys, so
a collection's lines can be found with ``grep '"dcid": 1234'`` or a log shipper.

With the setting ``log_topic`` (``BEAMSTREAM_LOG_TOPIC=1``) every line also goes,
as it is, to the ``logs`` topic (keyed by service), best effort: see
:class:`KafkaLogHandler`.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from beamstream.platform.settings import Settings

#: The logger librdkafka's own messages arrive on (beamstream.kafka_clients); never shipped to the log
#: topic, since shipping them would make the log producer log about itself, record after record.
LIBRDKAFKA_LOGGER = "beamstream.librdkafka"

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON line with service, host, pid and any extra fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "host": self.host,
            "pid": os.getpid(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RepeatFilter(logging.Filter):
    """Lets a message through once per ``window_s`` seconds, then says how many repeats it held back.

    librdkafka reports every failed reconnect (several a second per client while a broker is
    down); without this, a broker restart wrote megabytes of identical lines per worker.
    Messages are compared with their numbers removed ("after 3ms", ports, counters).
    """

    def __init__(self, window_s: float = 30.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int]] = {}  # shape -> (last let through, held back since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        shape = _DIGITS.sub("#", record.getMessage())
        with self._lock:
            last, held = self._seen.get(shape, (float("-inf"), 0))
            if record.created - last < self.window_s:
                self._seen[shape] = (last, held + 1)
                return False
            if len(self._seen) > 1000:  # bound the memory of a long-lived service
                self._seen.clear()
            self._seen[shape] = (record.created, 0)
        if held:
            record.msg = f"{record.getMessage()} (and {held} more like it in the last {self.window_s:.0f} s)"
            record.args = None
        return True


_DIGITS = re.compile(r"\d+")


class KafkaLogHandler(logging.Handler):
    """Sends each JSON log line to the log topic with a plain (non-transactional) producer, best effort.

    Logging must never stall or stop a service because Kafka is slow or down, so a
    record is only queued in the producer (bounded by ``queue_size``); when the queue
    is full, or a line cannot be delivered within ``delivery_timeout_s``, it is
    dropped and counted (:attr:`dropped`, ``beamstream_log_records_dropped``). The
    same line still reaches stderr through the other handler. On :meth:`close` (at
    exit, through :func:`logging.shutdown`) the queue is flushed for at most
    ``flush_timeout_s``.
    """

    def __init__(self, settings: Settings, service: str, formatter: logging.Formatter, queue_size: int = 10_000,
                 delivery_timeout_s: float = 60.0, flush_timeout_s: float = 5.0) -> None:
        from beamstream.platform.kafka_clients import make_producer
        from beamstream.platform.topics import topic_name

        super().__init__()
        self.setFormatter(formatter)
        self.addFilter(lambda record: not record.name.startswith(LIBRDKAFKA_LOGGER))
        self.topic = topic_name(settings, "logs")
        self.key = service.encode()
        self.flush_timeout_s = flush_timeout_s
        self.dropped = 0
        self._pid = os.getpid()
        self._busy = threading.local()
        self._flush_gave_up = False
        self.producer = make_producer(settings, **{
            # Idempotence would turn message timeouts during a Kafka outage into a fatal producer error,
            # ending shipping for good; a log line lost or repeated now and then is acceptable.
            "enable.idempotence": False,
            "acks": "1",
            "queue.buffering.max.messages": queue_size,
            "queue.buffering.max.kbytes": 16 * 1024,
            "message.timeout.ms": int(delivery_timeout_s * 1000),
            "linger.ms": 50,  # log lines come in bursts; batch them
        })

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record's JSON line; drop it (counted) if the queue is full. Never raises or blocks."""
        # A record logged while this thread ships another (e.g. from the client itself) is not shipped:
        # it would recurse. A forked child cannot use the parent's producer (its threads did not fork).
        producer = self.producer
        if producer is None or getattr(self._busy, "on", False) or os.getpid() != self._pid:
            return
        self._busy.on = True
        try:
            line = self.format(record)
            try:
                producer.produce(self.topic, line.encode("utf-8"), self.key, on_delivery=self._delivered)
            except BufferError:
                self._drop("queue_full")
            producer.poll(0)  # serves delivery reports of earlier lines
        except Exception:  # a log handler must not take the service down
            self._drop("error")
        finally:
            self._busy.on = False

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self._drop("delivery_failed")

    def _drop(self, reason: str) -> None:
        from beamstream.platform import metrics

        self.dropped += 1
        metrics.log_record_dropped(reason)

    def flush(self) -> None:
        """Wait (at most ``flush_timeout_s``, once) for the queued lines to be delivered."""
        producer = self.producer
        if producer is None or os.getpid() != self._pid:
            return
        self._busy.on = True
        try:
            # logging.shutdown flushes then closes: after one flush ran out of time, don't wait again.
            left = producer.flush(0 if self._flush_gave_up else self.flush_timeout_s)
            self._flush_gave_up = self._flush_gave_up or left > 0
        except Exception:
            pass  # at exit, nothing left to do about it
        finally:
            self._busy.on = False

    def close(self) -> None:
        """Flush what is queued (bounded), drop what is left, and release the producer."""
        with self.lock:
            producer = self.producer
            if producer is not None and os.getpid() == self._pid:
                self.flush()
                self._busy.on = True
                try:
                    # Undelivered lines are given up (and counted through their reports) rather than left to
                    # a client that would keep reconnecting to a Kafka that is down for the rest of the process.
                    producer.purge()
                    producer.poll(0)
                except Exception:
                    pass
                finally:
                    self._busy.on = False
            self.producer = None
        super().close()


def configure_json_logging(service: str, level: int = logging.INFO, stream=None,
                           settings: Settings | None = None) -> None:
    """Send all logging to ``stream`` (stderr) as JSON lines tagged with ``service``; when
    ``settings.log_topic`` is on, the same lines go to the ``logs`` topic too."""
    # A crash inside a C extension (librdkafka, HDF5 filters) then leaves the Python stacks in the log,
    # and `kill -USR1 <pid>` prints every thread's stack without stopping a service that seems stuck.
    try:
        faulthandler.enable()
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (captured, embedded)
        pass
    formatter = JsonFormatter(service)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handlers: list[logging.Handler] = [handler]
    if settings is not None and settings.log_topic:
        from confluent_kafka import KafkaException

        try:
            handlers.append(KafkaLogHandler(settings, service, formatter))
        except KafkaException as exc:  # a client that cannot even be configured: log to stderr only
            handler.handle(logging.makeLogRecord({
                "name": "beamstream.logs", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "log topic disabled: %s", "args": (exc.args[0].str(),)}))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, KafkaLogHandler):
            old.close()  # configured again (tests, the demo): don't leave a producer behind
    root.handlers[:] = handlers
    root.setLevel(level)
    # librdkafka narrates every reconnect: keep its warnings and errors, and each kind once in a while.
    librdkafka = logging.getLogger(LIBRDKAFKA_LOGGER)
    librdkafka.setLevel(max(level, logging.WARNING))
    if not any(isinstance(f, RepeatFilter) for f in librdkafka.filters):
        librdkafka.addFilter(RepeatFilter())
