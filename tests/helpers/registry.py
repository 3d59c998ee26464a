"""A running local schema registry for tests (the project's launcher, in a temporary home on a free port).

Nothing in the product imports this module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from beamstream.operations.registry import LocalRegistry
from beamstream.platform.settings import load_settings
from tests.helpers.harness import free_port_pair


@contextmanager
def running_registry(home: Path) -> Iterator[LocalRegistry]:
    """Start a registry with its state under ``home``; stopped when the block ends. Failing to start fails."""
    launcher = LocalRegistry(load_settings(home=home, local_registry_port=free_port_pair()))
    launcher.up(progress=False)
    try:
        yield launcher
    finally:
        launcher.down()
