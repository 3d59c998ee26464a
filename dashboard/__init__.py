"""The Beamstream dashboard: a small web app showing collections, heat maps, services and dead letters.

* :mod:`dashboard.view` — the in-memory view, folded from committed topic records (no Kafka import).
* :mod:`dashboard.feed` — the background read_committed consumer that feeds the view.
* :mod:`dashboard.auth` — who may act (a staff token today; one function to swap for OIDC).
* :mod:`dashboard.actions` — reinject a dead letter, reprocess a collection.
* :mod:`dashboard.web` — the aiohttp application: JSON API, ``/metrics`` and the static page.
* :mod:`dashboard.server` — runs feed and web server together, in the foreground or a thread.
* :mod:`dashboard.kafka_views` — read-only views of the cluster: topics, messages, consumer groups and their lag.
* :mod:`dashboard.kafka_routes` — their ``GET /api/kafka/...`` routes, run off the event loop.
"""
