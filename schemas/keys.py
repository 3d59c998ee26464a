"""Message keys: collection-scoped events are keyed by their dcid as decimal ASCII.

Image events are the exception: ``<dcid>:<image number>`` spreads one collection's
images over every partition of the images topic, so every worker can take a share
of one collection. Nothing needs a collection's images in order, and the results
go back to dcid keys (co-partitioned with the collection's start and end events).
"""

from __future__ import annotations


def dcid_key(dcid: int) -> bytes:
    """The key of every event of collection ``dcid`` (so its events share a partition)."""
    return str(int(dcid)).encode()


def image_key(dcid: int, image_number: int) -> bytes:
    """The key of an image event: its dcid and image number."""
    return f"{int(dcid)}:{int(image_number)}".encode()


def parse_dcid_key(key: bytes | None) -> int | None:
    """The dcid of a key written by :func:`dcid_key` or :func:`image_key`, or None if it is neither."""
    try:
        return int(key.split(b":", 1)[0]) if key else None
    except ValueError:
        return None
