"""bluesky-kafka's Publisher for tests, as the product's simulated beamline makes it
(:mod:`beamstream.producers.bluesky_beamline`), under the tests' one key."""

from __future__ import annotations

from bluesky_kafka import Publisher

from beamstream.platform.settings import Settings
from beamstream.producers.bluesky_beamline import document_publisher

#: The Publisher's key: every document of the beamline's RunEngine on one partition.
PUBLISHER_KEY = "i03-re"


def publisher_for(settings: Settings, topic: str) -> Publisher:
    """bluesky-kafka's own Publisher, as a beamline would subscribe it to its RunEngine."""
    return document_publisher(settings, topic, PUBLISHER_KEY)
