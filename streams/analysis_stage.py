"""The analysis stage: image events in, one result (or one dead letter) per image out.

Consumer group ``<prefix>analysis`` on the images topic. Each result commits with its
image event's offset in one KIP-447 transaction (:mod:`beamstream.engine`). Any worker may
take any image partition, so the analysis scales with the number of workers, and each
worker analyses up to ``--threads`` images at once (the engine runs :meth:`process` on a
pool of threads; the numba kernels and the readers' decompression release the GIL). A
failing image is retried with backoff before it goes to the dead-letter topic.

An image event published twice (producers publish at least once) is answered once: the stage's
table (:mod:`beamstream.streams.answered_images`) knows the images answered per images partition,
collection and processing job, and a copy of an answered event is skipped (no result, no dead
letter; counted and logged). Replayed events (``beamstream replay``) are always analysed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Message, TopicPartition

from beamstream.diffraction.errors import DiffractionError, SpotFindingError
from beamstream.engine.dead_letters import DeadLetters
from beamstream.engine.stage import Processor
from beamstream.engine.transactions import Output
from beamstream.platform import metrics
from beamstream.platform.retained import header_count
from beamstream.platform.settings import Settings, path_within_roots
from beamstream.platform.topics import topic_name
from beamstream.producers.replay import REPLAYED_HEADER
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import Serde, SerdeError
from beamstream.streams.analysers import Analyser, noop_analysis
from beamstream.streams.answered_images import DEFAULT_RETENTION_S, AnsweredImages, ImageEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often an image is tried before it goes to the dead-letter topic."""

    attempts: int = 3
    backoff_s: float = 0.5  # first retry delay, doubled each time


class AnalysisProcessor(Processor):
    """Turns image events into ImageResults with ``analyser``; stamps each with ``worker_id``. Answered images
    are kept for ``answered_retention_s`` after their collection's last answer (copies later than that are
    analysed again)."""

    def __init__(self, settings: Settings, serde: Serde, analyser: Analyser, worker_id: str,
                 retry: RetryPolicy = RetryPolicy(), answered_retention_s: float = DEFAULT_RETENTION_S) -> None:
        self.settings, self.serde, self.analyser, self.worker_id, self.retry = (
            settings, serde, analyser, worker_id, retry)
        self.images_topic = topic_name(settings, "images")
        self.results_topic = topic_name(settings, "results")
        self.dead_letters = DeadLetters(serde, topic_name(settings, "deadletter"), "worker/{topic}")
        self.answered = AnsweredImages(settings, topic_name(settings, "workers-answered-changelog"),
                                       self.images_topic, answered_retention_s)
        self.tables = (self.answered,)
        self.images_analysed = 0
        self.dead_lettered = 0
        self.duplicates_skipped = 0
        self._counting = threading.Lock()  # process() runs on several threads at once

    def process(self, messages: list[Message]) -> list[Output]:
        """One result or dead letter per image event, none for a copy of one already answered; never raises
        for bad input."""
        outputs = (self.analyse_event(message) for message in messages)
        return [output for output in outputs if output is not None]

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Marks not yet committed for revoked partitions are dropped (their next owner analyses those events)."""
        self.answered.forget(tp.partition for tp in partitions if tp.topic == self.images_topic)

    def aborted(self) -> None:
        """The batch's events are analysed again, so their marks are made again."""
        self.answered.discard_pending()

    def tick(self) -> None:
        """Expire the answered images of collections past their retention."""
        self.answered.expire(time.time())

    def analyse_event(self, message: Message) -> Output | None:
        """The result of one image event, its dead letter, or None for a copy of an image already answered."""
        try:
            image = self.serde.decode(message.value(), self.images_topic, "ImageArrived").value
        except SerdeError as exc:
            return self._dead_letter(message, str(exc), type(exc).__name__)
        event = ImageEvent(message.partition(), message.offset(), image["dcid"], image["processing_job_id"],
                           image["image_number"])
        if not self.answered.begin(event, deliberate=header_count(message.headers(), REPLAYED_HEADER) > 0):
            self._skip_copy(event)
            return None
        answered = False
        try:
            output = self._answer(message, image)
            answered = output[0] == self.results_topic
            return output
        finally:
            # A result marks the image answered; a dead letter (or a bug) leaves it open for a copy or a reinjection.
            (self.answered.answered if answered else self.answered.release)(event)

    def _answer(self, message: Message, image: dict) -> Output:
        """The result of a decoded image event, or its dead letter."""
        dcid, number, path = image["dcid"], image["image_number"], image["file_path"]
        if not path_within_roots(path, self.settings.data_roots):
            reason = f"{path} is outside the configured data roots ({', '.join(self.settings.data_roots)})"
            return self._dead_letter(message, reason, "OutsideDataRoots", dcid=dcid, image_number=number)
        fields, error, attempts = self._analyse_with_retries(image)
        if fields is None:
            reason = f"image {number} of dcid {dcid} ({path}, frame {image['frame_index']}): {error}"
            return self._dead_letter(message, reason, type(error).__name__, attempts=attempts, dcid=dcid,
                                     image_number=number)
        result = {
            "dcid": dcid, "image_number": number, "file_path": path, "frame_index": image["frame_index"],
            "processing_job_id": image["processing_job_id"], **fields,
            "event_time": image["arrival_time"], "result_time": datetime.now(UTC), "worker_id": self.worker_id,
        }
        with self._counting:
            self.images_analysed += 1
        latency_s = (result["result_time"] - image["arrival_time"]).total_seconds()
        metrics.image_analysed(latency_s, result["analysis_time_s"])
        log.info("image analysed", extra={
            "dcid": dcid, "image": number, "spots": result["n_spots_no_ice"],
            "d_min": result["estimated_d_min"], "latency_ms": round(latency_s * 1000, 1)})
        return (self.results_topic, dcid_key(dcid), self.serde.encode("ImageResult", result, self.results_topic))

    def _analyse_with_retries(self, image: dict) -> tuple[dict | None, BaseException | None, int]:
        """(result fields or None, the last error, attempts made)."""
        dcid, number, path, frame = image["dcid"], image["image_number"], image["file_path"], image["frame_index"]
        error: BaseException | None = None
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return self.analyser(path, frame), None, attempt
            except SpotFindingError as exc:
                # DIALS refuses frames that are mostly "strong" (saturated, blank with
                # noise); the beamline still needs a result for that grid position.
                log.warning("no usable spots: %s", exc, extra={"dcid": dcid, "image": number})
                fields = noop_analysis(path, frame)
                fields["analysis_backend"] = "refused"
                return fields, None, attempt
            except (DiffractionError, OSError) as exc:
                error = exc
            except Exception as exc:  # a bug in analysis must not stop the collection
                error = exc
                log.exception("analysis failed", extra={"dcid": dcid, "image": number})
            if attempt < self.retry.attempts:
                time.sleep(self.retry.backoff_s * 2 ** (attempt - 1))
        return None, error, self.retry.attempts

    def _skip_copy(self, event: ImageEvent) -> None:
        with self._counting:
            self.duplicates_skipped += 1
        metrics.duplicate_image()
        log.info("image already answered, copy skipped", extra={
            "dcid": event.dcid, "image": event.image_number, "processing_job_id": event.processing_job_id,
            "partition": event.partition, "offset": event.offset})

    def _dead_letter(self, message: Message, reason: str, error_type: str, **context) -> Output:
        with self._counting:
            self.dead_lettered += 1
        metrics.dead_lettered(error_type)
        return self.dead_letters.output(message, reason, error_type, **context)
