"""The beamline side of bluesky-kafka for tests: a document topic, and a Publisher onto it."""

from __future__ import annotations

import time

from bluesky_kafka import Publisher
from confluent_kafka.admin import NewTopic

from beamstream.platform.kafka_clients import make_admin
from beamstream.platform.settings import Settings

#: The Publisher's key: every document of the beamline's RunEngine on one partition.
PUBLISHER_KEY = "i03-re"


def create_document_topic(settings: Settings, name: str) -> str:
    """Create the beamline's document topic ``name`` (one partition) and wait until the metadata lists it:
    the bridge expects it to exist, and checks it at start-up."""
    admin = make_admin(settings)  # kept while the future runs: a collected client cancels it
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)
    deadline = time.monotonic() + 30
    while name not in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{name} never appeared in the metadata"
        time.sleep(0.1)
    return name


def publisher_for(settings: Settings, topic: str) -> Publisher:
    """bluesky-kafka's own Publisher, as a beamline would subscribe it to its RunEngine."""
    return Publisher(topic=topic, bootstrap_servers=settings.kafka_bootstrap, key=PUBLISHER_KEY,
                     producer_config={"enable.idempotence": True}, flush_on_stop_doc=True)
