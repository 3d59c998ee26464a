"""Run the dashboard: the feed thread and the web server, in the foreground or in a background thread.

``beamstream dashboard`` runs it in the foreground until SIGTERM/SIGINT; the demo and
the tests start a :class:`DashboardServer` in a thread next to their own work.
"""

from __future__ import annotations

import asyncio
import signal
import threading

from aiohttp import web

from beamstream.dashboard.feed import Feed
from beamstream.dashboard.view import DashboardView
from beamstream.dashboard.web import create_app
from beamstream.platform.settings import Settings


class DashboardServer:
    """The dashboard on ``host:port`` (port 0: any free port) served from a daemon thread."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.settings, self.host, self.port = settings, host, port
        self.view = DashboardView()
        self.feed = Feed(settings, self.view)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="dashboard-web", daemon=True)

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8080/``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(create_app(self.settings, self.view), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        # With port 0 the OS chose one: report what was bound.
        self.port = self._runner.addresses[0][1]

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._start_site())
        except BaseException as exc:  # e.g. the port is taken: tell start() rather than die silently
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self, timeout: float = 30.0) -> DashboardServer:
        """Start feed and web server; returns once the server listens (raises if it cannot)."""
        self.feed.start()
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the dashboard did not start listening in time")
        if self._error is not None:
            self.feed.stop()
            raise OSError(f"the dashboard cannot listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        """Stop the web server and the feed."""
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self.feed.stop()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_forever(settings: Settings, host: str, port: int, on_ready=None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT; ``on_ready(url)`` once listening."""
    server = DashboardServer(settings, host, port).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if on_ready:
        on_ready(server.url)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
