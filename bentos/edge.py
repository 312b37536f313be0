"""The service's edge: what a request meets before a route, and how a failure becomes an answer.

- ``RequestGuard``: what the API cannot take (API key, non-JSON, a body over 2 MB however it arrives);
- ``QuietClientErrors``: a client's 4xx is one INFO line, without a traceback or the input;
- ``answer``: a store outage is a 503 to retry; any other failure a JSON 500, with its cause in the log.

It knows nothing of the routes behind it beyond which paths are open: this module imports no other
part of ``bentos``.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import traceback
import uuid
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.responses import JSONResponse

MAX_BODY_BYTES = 2_000_000
UI_MOUNT = "/ui"  # where the profile explorer is mounted: its page and static files are open
logger = logging.getLogger("persona.service")


def is_public(path: str) -> bool:
    """The explorer's page and its static files hold no data: they load without the key (its data calls need it)."""
    if ".." in path:  # never let a static-looking path reach anything else
        return False
    return path in (UI_MOUNT, UI_MOUNT + "/", UI_MOUNT + "/index.html") or path.startswith(UI_MOUNT + "/static/")


class RequestGuard:
    """Reject what the API cannot take with a JSON 4xx before it reaches BentoML.

    - an API key, when ``PERSONA_API_KEY`` is set (401; the health probes stay open);
    - a POST body that is not JSON (415) or larger than ``MAX_BODY_BYTES`` (413), whether it says
      so in Content-Length or not (chunked transfer encoding): the bytes are counted as they arrive.
    """

    OPEN = ("/healthz", "/livez", "/readyz", "/metrics", "/docs", "/docs.json", "/")
    BODY_METHODS = ("POST", "PUT", "PATCH")
    DRAIN_BYTES = 4 * MAX_BODY_BYTES  # read (and drop) this much of an oversized body, so the 413 is read

    def __init__(self, app) -> None:
        self.app = app
        self.key = os.environ.get("PERSONA_API_KEY")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope.get("headers") or []}
        problem = self._problem(scope, headers)
        if problem is None and scope.get("method") in self.BODY_METHODS:
            body = await self._read_body(receive)
            if body is _GONE:
                return
            if body is None:
                problem = (413, f"request body over {MAX_BODY_BYTES} bytes")
            else:
                receive = _replay(body, receive)
        if problem:
            await JSONResponse({"error": problem[1]}, status_code=problem[0])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _problem(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if self.key and not hmac.compare_digest(given.encode(), self.key.encode()):  # in constant time
            return 401, "missing or wrong API key (header X-API-Key)"
        if scope.get("method") != "POST":
            return None
        if not headers.get("content-type", "").lower().startswith("application/json"):
            return 415, "send the request body as JSON (Content-Type: application/json)"
        declared = headers.get("content-length") or "0"
        if not declared.isdigit():
            return 400, "Content-Length is not a number"
        if int(declared) > MAX_BODY_BYTES:
            return 413, f"request body over {MAX_BODY_BYTES} bytes"
        return None

    async def _read_body(self, receive) -> bytes | object | None:
        """The whole body; None once it passes ``MAX_BODY_BYTES``; ``_GONE`` if the client left."""
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > MAX_BODY_BYTES:
                while more and size <= self.DRAIN_BYTES:  # a client still sending would miss the answer
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message.get("type") == "http.request" and message.get("more_body", False)
                return None
            chunks.append(chunk)
        return b"".join(chunks)


_GONE = object()


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that hands the app the body already read, then defers to the server's."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class QuietClientErrors(logging.Filter):
    """BentoML logs every failed request at ERROR with a traceback, a client's bad input included
    (``log_exception``). A 4xx answer becomes one INFO line, without the traceback or the input."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        status = _client_error(exc) if exc is not None else None
        if status is not None:
            where = record.args if isinstance(record.args, tuple) and len(record.args) == 2 else ("?", "?")
            record.msg, record.args = "client error on %s [%s]: %d %s", (*where, status, _what(exc))
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def _client_error(exc: BaseException) -> int | None:
    if isinstance(exc, ValidationError):
        return 400
    status = exc.error_code.value if isinstance(exc, BentoMLException) else getattr(exc, "status_code", None)
    return status if isinstance(status, int) and 400 <= status < 500 else None


def _what(exc: BaseException) -> str:
    """Which fields were wrong, never their values (they may be a user's text)."""
    if isinstance(exc, ValidationError):
        fields = sorted({".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors(include_input=False)})
        return f"{exc.error_count()} validation error(s): {', '.join(fields)}"
    return type(exc).__name__


def _quiet_client_errors() -> None:
    target = logging.getLogger("bentoml._internal.server.http_app")  # where BentoML's log_exception writes
    if not any(type(f).__name__ == QuietClientErrors.__name__ for f in target.filters):  # once, reloads too
        target.addFilter(QuietClientErrors())


_quiet_client_errors()


class StoreUnavailable(RuntimeError):
    """The online store did not answer: a clear 503, and the next request tries again."""


def _outage_types() -> tuple[type[BaseException], ...]:
    """Errors that mean a store did not answer (connection, timeout, locked), not a bug in a request."""
    import sqlite3

    import sqlalchemy.exc

    kinds: list[type[BaseException]] = [OSError, sqlite3.OperationalError, sqlalchemy.exc.OperationalError,
                                        sqlalchemy.exc.DisconnectionError]
    with contextlib.suppress(ImportError):
        import redis.exceptions

        kinds += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    with contextlib.suppress(ImportError):
        import psycopg

        kinds.append(psycopg.OperationalError)
    return tuple(kinds)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is a store not answering."""
    kinds, seen = _outage_types(), set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _cause(exc: BaseException) -> str:
    """The error chain's types and where each was raised, without the messages (which may quote a
    user's text or features): enough to find the bug, nothing personal in the log."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)[-8:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        parts.append(f"{type(exc).__module__}.{type(exc).__qualname__} at {where or '?'}")
        exc = exc.__cause__ or exc.__context__
    return "; raised while handling ".join(parts)


def incident(route: str, user_id: str, exc: BaseException) -> str:
    """Log a failure's cause under a new incident id, and return the id (the answer carries it)."""
    found = uuid.uuid4().hex[:12]
    logger.error("%s failed for user %r (incident %s): %s", route, user_id[:256], found, _cause(exc))
    return found




def answer(ctx: bentoml.Context, route: str, user_id: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one API call: a store outage is a 503 to retry; anything else a 500 without internals,
    whose cause goes to the log under an incident id the answer carries."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - the one place a request's failure becomes an answer
        if isinstance(exc, StoreUnavailable) or is_outage(exc):
            ctx.response.status_code = HTTPStatus.SERVICE_UNAVAILABLE
            reason = str(exc) if isinstance(exc, StoreUnavailable) else f"a store is unavailable: {type(exc).__name__}"
            return {"error": reason, "retry": True}
        ctx.response.status_code = HTTPStatus.INTERNAL_SERVER_ERROR
        return {"error": "internal error", "retry": False, "incident": incident(route, user_id, exc)}
