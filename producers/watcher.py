"""The file watcher: announces each image of a collection once it is readable on disk.

The facility's file-monitoring service, for acquisition systems that don't
announce images themselves. It polls a :mod:`producers.scanning` scanner (what
is readable now, no Kafka) and publishes the images found in one poll as one
Kafka transaction of ``ImageArrived`` events, in image-number order (through the
durable spool of :class:`~producers.publishing.SpooledPublisher`, so an unreachable
Kafka never stops the scanning). Images that never appear within the timeout are reported, and a ``CollectionEnded``
event (``success`` or ``incomplete``) closes the collection when asked.

Polling rather than inotify: it works the same on the network file systems
beamline data lands on, where inotify sees nothing written by other hosts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from beamstream.producers.events import collection_ended, image_arrived
from beamstream.producers.publishing import Publisher, publish
from beamstream.producers.scanning import Scanner, format_ranges, make_scanner

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 0.1
DEFAULT_TIMEOUT_S = 30.0


@dataclass
class WatchReport:
    """What one watch did: images announced, the ones that never came, and how long it took."""

    dcid: int
    template: str
    expected: int
    emitted: int = 0
    missing: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: ``success`` when every image was announced, else ``incomplete``.
    status: str = "incomplete"
    #: True when stopped from outside (signal, simulator) rather than by completion or timeout.
    stopped: bool = False
    timed_out: bool = False
    ended_published: bool = False

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line for people."""
        text = f"dcid {self.dcid}: {self.emitted}/{self.expected} images announced in {self.elapsed_s:.1f} s"
        if self.missing:
            text += f"; missing {format_ranges(self.missing)}"
        if self.stopped:
            text += " (stopped)"
        elif self.timed_out:
            text += " (timed out)"
        return text


def watch(
    publisher: Publisher,
    dcid: int,
    template: str,
    images: int,
    *,
    start: int = 1,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    poll_s: float = DEFAULT_POLL_S,
    end: bool = False,
    source: str = "watcher",
    stop: threading.Event | None = None,
    on_emitted: Callable[[int], None] | None = None,
    scanner: Scanner | None = None,
    processing_job_id: int | None = None,
) -> WatchReport:
    """Watch a collection's files and publish one ``ImageArrived`` per image as it becomes readable.

    ``template`` is a CBF ``#`` template or an EIGER/NeXus master file (see
    :func:`producers.scanning.make_scanner`). The watch ends when every image
    was announced, when no new image appeared for ``timeout_s`` seconds (None:
    never; with a :class:`~producers.publishing.SpooledPublisher` only seconds in which
    Kafka was reachable and the spool draining count), or when ``stop`` is set.
    With ``end``, a ``CollectionEnded`` event follows. ``on_emitted(n)`` is called
    after each published batch of n images. Raises :class:`~producers.scanning.TemplateError`
    for a bad template and :class:`~producers.publishing.ProducerError` when publishing fails.
    """
    if poll_s <= 0:
        raise ValueError(f"poll interval must be positive, got {poll_s}")
    scanner = scanner or make_scanner(template, images, start)
    report = WatchReport(dcid=dcid, template=template, expected=images)
    # A spooled publisher says whether Kafka is reachable; the "no new image" clock runs only while it is,
    # so an outage never turns into missing images. Scanning and spooling go on regardless.
    can_publish = getattr(publisher, "can_publish", None)
    started = last_tick = time.monotonic()
    waited = 0.0  # seconds without a new image, counted while events could be published
    while True:
        poll_started = time.monotonic()
        found = scanner.scan()
        if found:
            events = [image_arrived(dcid, ref.image_number, ref.file_path, ref.frame_index, source=source,
                                    processing_job_id=processing_job_id) for ref in found]
            publish(publisher, events)  # one transaction per poll: consumers never see half a batch
            report.emitted += len(found)
            waited = 0.0
            log.debug("dcid %s: announced images %s", dcid, format_ranges([ref.image_number for ref in found]))
            if on_emitted is not None:
                on_emitted(len(found))
        now = time.monotonic()
        if not found and (can_publish is None or can_publish()):
            waited += now - last_tick
        last_tick = now
        if report.emitted >= images:
            break
        if stop is not None and stop.is_set():
            report.stopped = True
            break
        if timeout_s is not None and waited > timeout_s:
            report.timed_out = True
            break
        # Sleep what is left of the poll interval, so slow publishes don't stretch the cadence.
        delay = max(0.0, poll_s - (time.monotonic() - poll_started))
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)

    report.elapsed_s = round(time.monotonic() - started, 3)
    report.missing = scanner.pending
    report.status = "success" if not report.missing else "incomplete"
    if report.missing:
        why = "watch stopped" if report.stopped else f"no new image for {timeout_s:g} s"
        log.warning("dcid %s: %d of %d images never arrived (%s): %s", dcid, len(report.missing), images, why,
                    format_ranges(report.missing))
    if end:
        publish(publisher, [collection_ended(dcid, report.emitted, report.status, processing_job_id)])
        report.ended_published = True
    return report
