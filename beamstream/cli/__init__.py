"""The ``beamstream`` command line, the top layer: it alone may import every other layer."""
