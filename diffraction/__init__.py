"""Beamstream's science core: detector image readers, DIALS-compatible spot
finding and per-image statistics. Pure functions, no Kafka."""
