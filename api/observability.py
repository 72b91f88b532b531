"""Logs (one JSON object per line, or human-readable) carrying a request id, and Prometheus metrics.

The request id comes from the caller's ``X-Request-ID`` (when it is a sane token) or is made here;
it is echoed back on the response and attached to every log line written while serving the
request, through a context variable.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Gauge, Histogram

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tally_request_id", default=None)
_SANE_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Attributes every LogRecord has; anything else on a record was passed with ``extra=``.
# (uvicorn adds ``color_message``, a copy of the message with terminal colours.)
_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}

access_log = logging.getLogger("tally.access")

# Prometheus metrics live in prometheus_client's process-wide registry, as is conventional: the
# registry *is* the process's metrics, whatever number of apps it builds (tests build many).
COMMANDS: Final = Counter(
    "tally_commands", "Commands by kind and outcome", ["kind", "outcome"]
)  # outcome: accepted, replayed, insufficient_funds, rejected
PROJECTION_LAG_EVENTS: Final = Gauge(
    "tally_projection_lag_events", "Committed events the projection has not applied yet", ["projection"]
)
PROJECTION_LAG_SECONDS: Final = Gauge(
    "tally_projection_lag_seconds", "Age of the oldest event the projection has not applied", ["projection"]
)
PROJECTION_STOPPED: Final = Gauge(
    "tally_projection_stopped", "1 when a poison event stopped the projection", ["projection"]
)
POOL_CONNECTIONS: Final = Gauge("tally_db_pool_connections", "Commands' pool connections", ["state"])
READ_POOL_CONNECTIONS: Final = Gauge("tally_db_read_pool_connections", "Queries' pool connections", ["state"])
COMMAND_QUEUE: Final = Gauge("tally_command_queue", "Commands waiting for a batch in this process")
FEED_CONSUMERS: Final = Gauge(
    "tally_feed_consumers",
    "Event feed requests waiting for events (poll) and open streams (stream)",
    ["kind"],
)
FEED_EVENTS: Final = Counter("tally_feed_events", "Events served by the event feed", ["kind"])
WEBHOOK_DELIVERIES: Final = Gauge(
    "tally_webhook_deliveries",
    "Deliveries not acknowledged, by subscription and status",
    ["webhook", "status"],
)  # status: pending, parked
WEBHOOK_LAG: Final = Gauge(
    "tally_webhook_delivery_lag_seconds",
    "Age of the oldest event the subscription has not acknowledged",
    ["webhook"],
)
# Read from the database at each scrape (the dispatcher may run in another process): counts since the
# subscription was made.
WEBHOOK_ATTEMPTS: Final = Gauge(
    "tally_webhook_attempts", "Delivery attempts of the subscription", ["webhook"]
)
WEBHOOK_FAILURES: Final = Gauge(
    "tally_webhook_failures", "Failed delivery attempts of the subscription", ["webhook"]
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (request_id := REQUEST_ID.get()) is not None:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry, enc_hook=str).decode()


class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if (request_id := REQUEST_ID.get()) is not None:
            extra = {"request_id": request_id, **extra}
        return line + ("  " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else "")


def configure_logging(level: str, log_format: str) -> None:
    """Route every logger (Tally's, uvicorn's, asyncpg's) through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it narrates every pg_ctl call at INFO


# Requests by route template and status, as Litestar's Prometheus middleware counted them (same names
# and labels). Measured (bench/request_cost.py under callgrind): that middleware cost 16 % of the
# instructions of a GET of a wallet (a Request and its URL parsed, label sets looked up under a lock
# four times, per request); this one looks its label sets up once per route and status.
_LABELS: Final = ["method", "path", "status_code", "app_name"]
REQUESTS: Final = Counter("tally_requests", "Total requests", _LABELS)
REQUEST_SECONDS: Final = Histogram("tally_request_duration_seconds", "Request duration, in seconds", _LABELS)
REQUESTS_IN_PROGRESS: Final = Gauge(
    "tally_requests_in_progress", "Total requests currently in progress", ["method", "path", "app_name"]
)
_UNCOUNTED: Final = ("/metrics", "/docs", "/health")


def metrics_middleware(app: ASGIApp) -> ASGIApp:
    """Count each routed request (not /metrics, the docs or health checks) by method, route template
    and status, with its duration, and those in progress."""
    done: dict[tuple[str, str, int], tuple[Any, Any]] = {}
    running: dict[tuple[str, str], Any] = {}

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"].startswith(_UNCOUNTED):
            await app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope.get("path_template") or scope["path"]
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge = running.get((method, path))
        if gauge is None:
            gauge = running[(method, path)] = REQUESTS_IN_PROGRESS.labels(method, path, "tally")
        gauge.inc()
        try:
            await app(scope, receive, send_status)
        finally:
            gauge.dec()
            counted = done.get((method, path, status))
            if counted is None:
                labels = (method, path, str(status), "tally")
                counted = done[(method, path, status)] = (
                    REQUESTS.labels(*labels),
                    REQUEST_SECONDS.labels(*labels),
                )
            counted[0].inc()
            counted[1].observe(time.perf_counter() - started)

    return middleware


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Assign the request id, echo it as ``X-Request-ID``, and write one access log line."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _SANE_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            method = scope.get("method", "")
            access_log.info(
                "%s %s %s",
                method,
                scope["path"],
                status,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            REQUEST_ID.reset(token)

    return middleware
