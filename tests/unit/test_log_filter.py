"""librdkafka's reconnect chatter is let through once per window, with a count of what was held back."""

from __future__ import annotations

import logging

from beamstream.platform.logs import RepeatFilter


def _record(message: str, at: float) -> logging.LogRecord:
    record = logging.LogRecord("beamstream.librdkafka", logging.ERROR, __file__, 1, message, None, None)
    record.created = at
    return record


def test_repeats_are_held_back_and_counted():
    repeat = RepeatFilter(window_s=30)
    passed = []
    for i, at in enumerate((0.0, 1.0, 2.0, 31.0)):
        record = _record(f"Connect to ipv4#127.0.0.1:{40000 + i} failed (after {i}ms in state CONNECT)", at)
        if repeat.filter(record):
            passed.append(record.getMessage())
    assert passed == ["Connect to ipv4#127.0.0.1:40000 failed (after 0ms in state CONNECT)",
                      "Connect to ipv4#127.0.0.1:40003 failed (after 3ms in state CONNECT) "
                      "(and 2 more like it in the last 30 s)"]


def test_different_messages_are_not_held_back():
    repeat = RepeatFilter(window_s=30)
    assert repeat.filter(_record("Broker: Not coordinator", 0.0))
    assert repeat.filter(_record("Consumer group session timed out", 0.5))
    assert not repeat.filter(_record("Broker: Not coordinator", 1.0))
