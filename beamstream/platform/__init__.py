"""The Kafka platform (layer 2): settings, clients, topics, lag and retained reads, logs, metrics,
process handling and the dead-letter store. It imports only the ground (``beamstream.schemas``)."""
