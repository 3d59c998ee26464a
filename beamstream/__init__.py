"""Beamstream: per-image analysis of synchrotron crystallography data on Kafka.

Everything installs under this one name, in layers whose imports only point down:

1. ground: ``beamstream.diffraction`` (the science core, no Kafka) and ``beamstream.schemas`` (the wire format);
2. ``beamstream.platform`` (settings, clients, topics, lag, logs, metrics, processes) and
   ``beamstream.engine`` (the one exactly-once engine);
3. services: ``beamstream.streams``, ``beamstream.producers``, ``beamstream.connectors``, ``beamstream.dashboard``;
4. ``beamstream.operations`` (launchers, local security, the process monitor);
5. ``beamstream.cli``, alone at the top.
"""
