"""A bluesky RunEngine callback that publishes each run as a Beamstream collection, in process.

``RE.subscribe(BeamstreamCallback.open(settings))``: every document goes through the translator
(:mod:`beamstream.producers.bluesky_documents`) and the events it means are published at once through the
producers' publisher (a durable spool by default: the RunEngine never waits for Kafka, and images taken
while Kafka is away are published when it is back).

A document that cannot be translated (a missing descriptor, an unknown detector, a path outside the
data roots, a start without a dcid ...) has no message on Kafka to dead-letter: the dead-letter topic
holds messages a consumer read. So the callback logs its one-line reason once (``errors`` keeps them),
ends the run's collection as ``failed`` if it had started (the workers then summarise what they got
instead of waiting for images that will not be announced), and drops the rest of that run. The
RunEngine is never interrupted: the plan's data is on disk whatever Beamstream makes of it, and a plan
waiting for the collection's summary learns of the failure from it (or from its timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from beamstream.errors import BeamstreamError
from beamstream.platform.settings import Settings
from beamstream.producers.bluesky_documents import DocumentError, RunState, translate
from beamstream.producers.events import Event, collection_ended
from beamstream.producers.publishing import Publisher, SpooledPublisher, drain_spool, open_publisher, publish

log = logging.getLogger(__name__)

#: The spool the callback's events go through unless told otherwise.
DEFAULT_SPOOL = "bluesky"


class BeamstreamCallback:
    """Publishes the runs a RunEngine emits as Beamstream collections (one run at a time, as the RunEngine
    runs them). ``errors`` lists the one-line reason of every document not translated, in order."""

    def __init__(self, publisher: Publisher, *, data_roots: Sequence[str] = (), owns_publisher: bool = False
                 ) -> None:
        self.publisher = publisher
        self.data_roots = tuple(data_roots)
        self.state: RunState | None = None
        self.errors: list[str] = []
        self._owns_publisher = owns_publisher
        self._dropped_run: str | None = None  # a run given up on: the rest of its documents are ignored

    @classmethod
    def open(cls, settings: Settings, spool: str | None = DEFAULT_SPOOL) -> BeamstreamCallback:
        """A callback publishing through spool ``spool`` (None: straight to Kafka, which must be reachable), with
        the settings' data roots; :meth:`close` it when done."""
        return cls(open_publisher(settings, spool), data_roots=settings.data_roots, owns_publisher=True)

    def __call__(self, name: str, doc: dict) -> None:
        """Take one document (the RunEngine's callback signature)."""
        if self._dropping(name, doc):
            return
        try:
            state, events = translate(self.state, name, doc, data_roots=self.data_roots)
        except DocumentError as exc:
            self._give_up(name, doc, str(exc))
            return
        try:
            self._publish(events)
        except BeamstreamError as exc:  # the spool's disk, or Kafka without a spool
            self._give_up(name, doc, str(exc))
            return
        self.state = state

    def close(self, timeout_s: float = 30.0) -> None:
        """Release the publisher if the callback opened it (a spool is drained for up to ``timeout_s`` first)."""
        if not self._owns_publisher:
            return
        if isinstance(self.publisher, SpooledPublisher):
            drain_spool(self.publisher, timeout_s)
        else:
            self.publisher.close()

    def __enter__(self) -> BeamstreamCallback:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _publish(self, events: list[Event]) -> None:
        if events:
            publish(self.publisher, events)

    def _give_up(self, name: str, doc: dict, reason: str) -> None:
        """Log the reason once, end the collection as failed if it started, and drop the rest of the run."""
        self.errors.append(reason)
        state, self.state = self.state, None
        log.warning("bluesky %s document not published: %s", name, reason,
                    extra={"dcid": state.dcid if state else None})
        if state is not None:
            run = state.run_uid
        else:  # a start refused, or a document of a run whose start this callback never saw
            run = str(doc.get("uid")) if name == "start" else "(a run whose start was not taken)"
        self._dropped_run = None if name == "stop" else run
        if state is not None and state.started:
            try:  # close the collection so the workers summarise what they got
                self._publish([collection_ended(state.dcid, state.images, "failed")])
            except BeamstreamError as exc:
                log.warning("dcid %s: could not end the collection as failed: %s", state.dcid, exc)

    def _dropping(self, name: str, doc: dict) -> bool:
        """True for a document of a run given up on (its stop ends the dropping; a new start does too)."""
        if self._dropped_run is None or name == "start":
            self._dropped_run = None
            return False
        if name == "stop":
            self._dropped_run = None
        return True
