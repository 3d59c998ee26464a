"""Message keys: every collection-scoped event is keyed by its dcid as decimal ASCII."""

from __future__ import annotations


def dcid_key(dcid: int) -> bytes:
    """The key of every event of collection ``dcid`` (so its events share a partition)."""
    return str(int(dcid)).encode()


def parse_dcid_key(key: bytes | None) -> int | None:
    """The dcid of a key written by :func:`dcid_key`, or None if it is not one."""
    try:
        return int(key) if key else None
    except ValueError:
        return None
