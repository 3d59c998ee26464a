"""bluesky-kafka's Publisher for tests, as the product's simulated beamline makes it
(:mod:`beamstream.producers.bluesky_beamline`), under the tests' one key."""

from __future__ import annotations

from bluesky_kafka import Publisher
from event_model import compose_run

from beamstream.platform.settings import Settings
from beamstream.producers.bluesky_beamline import document_publisher

#: The Publisher's key: every document of the beamline's RunEngine on one partition.
PUBLISHER_KEY = "i03-re"


def publisher_for(settings: Settings, topic: str) -> Publisher:
    """bluesky-kafka's own Publisher, as a beamline would subscribe it to its RunEngine."""
    return document_publisher(settings, topic, PUBLISHER_KEY)


class SmallRun:
    """One small run's documents as composed with event_model: a detector ``det`` whose frames go to
    ``<folder>/run.h5`` (a stream resource) and a motor ``x`` in mm, in a descriptor ``primary``."""

    def __init__(self, dcid: int, folder: str, frames: int = 2) -> None:
        self.run = compose_run(metadata={"dcid": dcid, "detectors": ["det"], "num_points": frames,
                                         "experiment_type": "other"})
        self.descriptor = self.run.compose_descriptor(name="primary", data_keys={
            "det": {"dtype": "array", "shape": [1, 8, 8], "source": "sim", "external": "STREAM:"},
            "x": {"dtype": "number", "shape": [], "source": "sim", "units": "mm"},
        }, object_keys={"det": ["det"], "x": ["x"]})
        self.resource = self.resource_of("det", f"{folder}/run.h5")

    def resource_of(self, data_key: str, path: str):
        """A stream resource of this run for ``data_key``, its frames in ``path``."""
        return self.run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                                                data_key=data_key, parameters={})

    def opening(self) -> list[tuple[str, dict]]:
        """The start, the descriptor and the detector's stream resource."""
        return [("start", self.run.start_doc), ("descriptor", self.descriptor.descriptor_doc),
                ("stream_resource", self.resource.stream_resource_doc)]

    def frame(self, index: int) -> list[tuple[str, dict]]:
        """Frame ``index``: its stream datum and the event with the motor's position."""
        datum = self.resource.compose_stream_datum(indices={"start": index, "stop": index + 1},
                                                   descriptor=self.descriptor.descriptor_doc)
        event = self.descriptor.compose_event(data={"x": 1.0 + index}, timestamps={"x": 0.0})
        return [("stream_datum", datum), ("event", event)]
