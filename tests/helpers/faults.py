"""What each fault test measured, for the README's fault table and ``scripts/soak``.

A fault test calls :func:`record_fault` once per run with what it counted. When
``BEAMSTREAM_FAULT_REPORT`` names a file, one JSON line is appended to it; the soak
script sets it, runs every test marked ``fault`` N times and tabulates the lines.
``BEAMSTREAM_FAULT_SEED`` (default 0) seeds whatever a fault test chooses at random
(which image the kill comes at, which broker ...), so a failing soak run can be repeated.
"""

from __future__ import annotations

import json
import os
import random
import time
from itertools import pairwise
from pathlib import Path

REPORT_ENV = "BEAMSTREAM_FAULT_REPORT"
SEED_ENV = "BEAMSTREAM_FAULT_SEED"


def fault_seed() -> int:
    """The seed of this run (``BEAMSTREAM_FAULT_SEED``, default 0)."""
    return int(os.environ.get(SEED_ENV, "0"))


def fault_random(name: str) -> random.Random:
    """A random generator for fault ``name``, seeded by the run's seed and the name."""
    return random.Random(f"{fault_seed()}:{name}")


def longest_pause(arrival_times: list[float], since: float = 0.0) -> float:
    """The longest time between consecutive arrivals that ends after ``since`` (a kill): how long a fault
    stopped them."""
    times = sorted(arrival_times)
    return max((later - earlier for earlier, later in pairwise(times) if later > since), default=0.0)


def record_fault(fault: str, *, images: int, lost: int, duplicated: int, recovery_s: float | None,
                 **extra: object) -> dict:
    """Record one run of ``fault``: images in the run, lost and duplicated results, seconds from the
    fault's end (the broker back, the process replaced ...) to the first result after it (None if
    not measured). Returns the record; appends it to ``$BEAMSTREAM_FAULT_REPORT`` when set."""
    record = {"fault": fault, "seed": fault_seed(), "images": images, "lost": lost, "duplicated": duplicated,
              "recovery_s": None if recovery_s is None else round(recovery_s, 2), "time": time.time(), **extra}
    path = os.environ.get(REPORT_ENV)
    if path:
        with Path(path).open("a") as report:
            report.write(json.dumps(record) + "\n")
    return record
