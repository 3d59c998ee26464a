"""The Kafka views' JSON routes (all ``GET``: they change nothing), served by :mod:`dashboard.web`.

Each request's cluster queries (:mod:`dashboard.kafka_views`) run in a small thread pool of their own, off
the event loop and apart from the actions' threads, each bounded in time. A mistake in the query is a 400,
a cluster that does not answer a 503, each with a one-line reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from beamstream.dashboard import kafka_views
from beamstream.platform.settings import Settings

#: At most this many cluster queries at once; more wait their turn (a page polls a few at a time).
WORKERS = 4

_POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("kafka_pool", ThreadPoolExecutor)


def add_routes(app: web.Application, settings: Settings, respond: Callable[[Any], web.Response]) -> None:
    """Add ``GET /api/kafka/...`` to ``app``; ``respond`` makes the JSON response of an answer."""
    app[_POOL] = ThreadPoolExecutor(WORKERS, thread_name_prefix="kafka-views")

    async def run(request: web.Request, view: Callable[..., Any], *args: Any) -> web.Response:
        try:
            answer = await asyncio.get_running_loop().run_in_executor(request.app[_POOL], view, settings, *args)
        except kafka_views.QueryError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from None
        except kafka_views.KafkaViewError as exc:
            raise web.HTTPServiceUnavailable(reason=str(exc)) from None
        return respond(answer)

    async def topics(request: web.Request) -> web.Response:
        return await run(request, kafka_views.list_topics)

    async def topic(request: web.Request) -> web.Response:
        return await run(request, kafka_views.describe_topic, request.match_info["topic"])

    async def messages(request: web.Request) -> web.Response:
        try:
            query = kafka_views.parse_browse(request.query)
        except kafka_views.QueryError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from None
        return await run(request, kafka_views.browse, request.match_info["topic"], query)

    async def groups(request: web.Request) -> web.Response:
        return await run(request, kafka_views.list_groups)

    async def group(request: web.Request) -> web.Response:
        return await run(request, kafka_views.describe_group, request.match_info["group"])

    async def close_pool(app: web.Application) -> None:
        app[_POOL].shutdown(wait=False, cancel_futures=True)

    app.router.add_get("/api/kafka/topics", topics)
    app.router.add_get("/api/kafka/topics/{topic}", topic)
    app.router.add_get("/api/kafka/topics/{topic}/messages", messages)
    app.router.add_get("/api/kafka/groups", groups)
    app.router.add_get("/api/kafka/groups/{group}", group)
    app.on_cleanup.append(close_pool)
