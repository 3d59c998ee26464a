"""The Kafka platform (layer 2): settings, clients, topics, lag and retained reads, logs, metrics,
and process handling. It imports only the ground (``beamstream.schemas``) and nothing of the engine."""
