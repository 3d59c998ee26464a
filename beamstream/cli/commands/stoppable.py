"""Run a long command's work so that SIGINT/SIGTERM stop it cleanly instead of killing it mid-transaction."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_stoppable(work: Callable[[threading.Event], T]) -> tuple[T, int | None]:
    """Run ``work(stop)`` until it returns; the first SIGINT/SIGTERM sets ``stop``, a second one interrupts.

    Returns the work's result and the number of the signal that stopped it
    (None when it finished on its own); the work's exceptions are re-raised.
    The work runs in a thread while the main thread only waits: a signal
    handler must not set an Event the interrupted thread might be holding the
    lock of, and the main thread here holds none.
    """
    stop = threading.Event()
    received: list[int] = []
    outcome: dict[str, object] = {}

    def handler(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt  # asked twice: give up waiting for a clean stop
        received.append(signum)
        stop.set()

    def target() -> None:
        try:
            outcome["value"] = work(stop)
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        thread = threading.Thread(target=target, name="command-work", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"], (received[0] if received else None)  # type: ignore[return-value]
