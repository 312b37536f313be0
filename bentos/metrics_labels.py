"""Bounded Prometheus labels: a request is counted under its route, never under the path it sent.

BentoML labels every request's metrics with the raw ``scope["path"]``. A path can hold a user id
(``/ui/api/users/u000263``) or anything a client makes up, so ``/metrics`` would serve user ids without
a key, labels would grow without bound, and an erased user's id would stay in the metric files. The
middleware BentoML builds is swapped here for a subclass that hands it the route's template as the
path and gives the real path back to the app inside.
"""

from __future__ import annotations

import re

from bentoml._internal.server.http import instruments

CHECKED_AGAINST = "bentoml 1.4"  # RunnerTrafficMetricsMiddleware(app, namespace, skip_paths) reads scope["path"]
REAL_PATH = "persona.path"
OTHER = "/other"  # every path that is no route of ours
API_ROUTES = ("/rank", "/profile", "/events", "/forget", "/export", "/metrics", "/docs", "/docs.json",
              "/schema.json", "/healthz", "/livez", "/readyz")
UI_TEMPLATES = (  # the explorer's routes (bentos/explorer.py), a parameter each at most
    (re.compile(r"^/ui/?$|^/ui/index\.html$"), "/ui"),
    (re.compile(r"^/ui/static/"), "/ui/static"),
    (re.compile(r"^/ui/api/shop$"), "/ui/api/shop"),
    (re.compile(r"^/ui/api/users$"), "/ui/api/users"),
    (re.compile(r"^/ui/api/users/."), "/ui/api/users/{user_id}"),
    (re.compile(r"^/ui/api/batches/."), "/ui/api/batches/{batch_id}"),
    (re.compile(r"^/ui/api/reports/."), "/ui/api/reports/{path}"),
)


def route_label(path: str) -> str:
    """The label for a request path: one of a fixed, small set."""
    if path in API_ROUTES:
        return path
    for pattern, template in UI_TEMPLATES:
        if pattern.search(path):
            return template
    return OTHER


class _RealPath:
    """Inside the metrics middleware: the app routes on the path the client sent."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if REAL_PATH in scope:
            scope = {**scope, "path": scope[REAL_PATH]}
        await self.app(scope, receive, send)


class RouteLabelledMetrics(instruments.RunnerTrafficMetricsMiddleware):
    def __init__(self, app, *args, **kwargs) -> None:
        super().__init__(_RealPath(app), *args, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"].startswith(("http", "websocket")) and scope["path"] != "/metrics":
            scope = {**scope, REAL_PATH: scope["path"], "path": route_label(scope["path"])}
        await super().__call__(scope, receive, send)


def install() -> None:
    """Before BentoML builds the app (it looks the class up by name when it does)."""
    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics
