"""Before a collection is declared incomplete: has every image announced for it been dealt with?

The summary timeout says how long an ended collection may stay quiet before its missing
images are given up. Quiet is not enough: an analysis stage held up (a worker wedged
after a broker restart, a queue of slow images) still has results to come, and a summary
published then would be short of them for good. So when the timeout has passed, the
collect stage waits, in two steps, until

1. the analysis group has taken in every image event written before that moment (its
   result or its dead letter is then committed), and
2. this collect stage has taken in every result written before the first step was done.

Only then does it ask for the collection to be summarised as incomplete. A new result
starts the timeout, and this wait, again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaException

from beamstream.platform.lag import GroupLag
from beamstream.platform.settings import Settings
from beamstream.platform.topics import group_name, topic_name

log = logging.getLogger(__name__)


@dataclass
class _Wait:
    partition: int
    quiet_since: float  # the collection's quiet time this wait is for
    image_marks: dict[int, int]  # images topic ends when the timeout had passed
    result_marks: dict[int, int] | None = None  # the results partition's end once the analysis caught up
    settled: bool = False
    logged: bool = False  # the wait for the analysis was logged (once per wait, not every tick)


class OutstandingImages:
    """Per collection (by table key), whether nothing it may still get is in flight."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.images = topic_name(settings, "images")
        self.results = topic_name(settings, "results")
        self._lag: GroupLag | None = None
        self._waits: dict[bytes, _Wait] = {}

    def settled(self, key: bytes, quiet_since: float | None) -> bool:
        """True when a wait for this very quiet time has finished."""
        wait = self._waits.get(key)
        return wait is not None and wait.settled and wait.quiet_since == quiet_since

    def settle(self, key: bytes, partition: int, quiet_since: float, dcid: int) -> bool:
        """Take the wait for ``key`` a step further (a few broker round trips); True once it is over.

        ``partition`` is the collection's partition (its results are co-partitioned). A broker
        that does not answer leaves the wait where it was, for the next call."""
        wait = self._waits.get(key)
        try:
            if wait is None or wait.quiet_since != quiet_since:
                wait = self._waits[key] = _Wait(partition, quiet_since, self.lag.end_offsets(self.images))
            if wait.result_marks is None:
                analysed = self.lag.committed_offsets(group_name(self.settings, "analysis"), self.images)
                if self.lag.events_between(self.images, analysed, wait.image_marks):
                    if not wait.logged:
                        wait.logged = True
                        log.info("collection timed out, waiting for images still being analysed",
                                 extra={"dcid": dcid})
                    return False
                wait.result_marks = self.lag.end_offsets(self.results, [partition])
            collected = self.lag.committed_offsets(group_name(self.settings, "collect"), self.results, [partition])
            if self.lag.events_between(self.results, collected, wait.result_marks):
                return False
        except (KafkaException, TimeoutError) as exc:
            log.warning("cannot tell whether images are still in flight: %s", exc, extra={"dcid": dcid})
            return False
        wait.settled = True
        return True

    def forget(self, key: bytes) -> None:
        """The collection was summarised."""
        self._waits.pop(key, None)

    def forget_partitions(self, partitions: set[int]) -> None:
        """This stage no longer owns these collection partitions."""
        for key in [k for k, wait in self._waits.items() if wait.partition in partitions]:
            del self._waits[key]

    @property
    def lag(self) -> GroupLag:
        if self._lag is None:
            self._lag = GroupLag(self.settings)
        return self._lag

    def close(self) -> None:
        """Close the measuring clients."""
        if self._lag is not None:
            self._lag.close()
            self._lag = None
