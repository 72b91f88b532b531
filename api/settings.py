"""Typed settings, read from the environment once (``load_settings``) and passed in explicitly."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, TypeVar

import msgspec

T = TypeVar("T")


# Every variable Tally reads (tests check that deployment files reference only these).
ENVIRONMENT_VARIABLES = (
    "DATABASE_URL", "HOST", "PORT", "TALLY_DATA_DIR", "TALLY_POOL_MIN_SIZE", "TALLY_POOL_MAX_SIZE",
    "TALLY_COMMAND_CONCURRENCY", "TALLY_COMMAND_TIMEOUT", "TALLY_LOCK_TIMEOUT", "TALLY_COMMAND_QUEUE",
    "TALLY_READ_POOL_MAX_SIZE", "TALLY_READ_TIMEOUT", "TALLY_READ_CONCURRENCY", "TALLY_CONNECT_TIMEOUT",
    "TALLY_CONSISTENCY_TIMEOUT", "TALLY_PROJECTOR_BATCH_SIZE", "TALLY_PROJECTOR_POLL_INTERVAL",
    "TALLY_IDLE_IN_TRANSACTION_TIMEOUT_MS", "TALLY_LOG_LEVEL", "TALLY_LOG_FORMAT",
    "TALLY_READY_MAX_LAG_SECONDS", "TALLY_MIGRATIONS_DIR", "TALLY_DOCS_PUBLIC", "TALLY_RATE_LIMIT",
    "TALLY_MAX_BODY_BYTES", "TALLY_OWNER_DATABASE_URL", "TALLY_APP_ROLE", "TALLY_APP_PASSWORD",
    "TALLY_ANCHOR_KEY", "TALLY_MAX_BATCH", "TALLY_BATCH_CONCURRENCY", "TALLY_FEED_HEARTBEAT",
    "TALLY_WEBHOOK_KEY", "TALLY_WEBHOOK_ALLOWED_HOSTS", "TALLY_WEBHOOK_TIMEOUT",
    "TALLY_WEBHOOK_RETRY_SECONDS", "TALLY_WEBHOOK_BACKOFF",
)  # fmt: skip


class SettingsError(ValueError):
    """An environment variable holds a value Tally cannot use; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # PostgreSQL URL. Unset: an embedded PostgreSQL under ``data_dir`` (development and tests).
    database_url: str | None = None
    # The schema owner's URL, for `tally migrate`, `tally rebuild`, `tally keys` and `tally seed`;
    # unset: the same server as DATABASE_URL (api/database.py, owner_url).
    owner_database_url: str | None = None
    # The least-privileged login role `tally migrate` creates and grants (api/migrate.py); with
    # TALLY_OWNER_DATABASE_URL unset, `tally serve` and `tally projector` connect as this role.
    app_role: str | None = None
    app_password: str | None = None
    # The key of anchors' HMACs (tally anchor, tally verify --anchor); kept outside the database.
    anchor_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".data")
    # Commands (and key checks, health) have their own pool; queries have theirs (read_pool_max_size),
    # so no flood of reads can take the connections commands need.
    pool_min_size: int = 2
    pool_max_size: int = 12
    read_pool_max_size: int = 8
    # Group commit: transaction commands run in at most this many batches at once per process;
    # commands arriving meanwhile join the next batch (commands/event_store.py).
    command_concurrency: int = 4
    # The longest a command request waits, queued or running, before it is answered 503
    # `unavailable` (it may still be applied: retried with its key, it replays). Also the
    # database's statement_timeout on the commands' connections.
    command_timeout: float = 10.0
    # How long a command waits for a wallet that another session holds locked, and for an
    # Idempotency-Key that another transaction is deciding, before 503 `unavailable`.
    lock_timeout: float = 2.0
    # Commands waiting for a batch, per process; more are refused at once with 503 `overloaded`.
    command_queue: int = 2000
    # The longest a query waits for a connection (then 503 `overloaded`) and runs (then 503
    # `unavailable`): the database's statement_timeout on the queries' connections.
    read_timeout: float = 5.0
    # Queries handled at once per process (the rest wait their turn, at most read_timeout): a
    # flood of reads takes a bounded share of the process, and commands keep the rest.
    read_concurrency: int = 4
    # Opening a connection to the database gives up after this long.
    connect_timeout: float = 5.0
    # How long a query with ``consistent_with`` waits for the projections before a 503.
    consistency_timeout: float = 5.0
    projector_batch_size: int = 2000
    # The projector wakes on NOTIFY; this is its fallback poll.
    projector_poll_interval: float = 1.0
    # Any session idle inside a transaction longer than this is ended by PostgreSQL: an open
    # transaction holds back the xmin the projectors read up to, stalling every projection.
    idle_in_transaction_timeout_ms: int = 5000
    log_level: str = "info"
    # "json": one JSON object per line (production); "console": human-readable lines.
    log_format: str = "json"
    # /health/ready's checks call a projection failing when it is
    # further behind than this; that never fails the readiness check itself.
    ready_max_lag_seconds: float = 60.0
    # The docs page and the OpenAPI document are served without a key unless this is false.
    docs_public: bool = True
    # Request bodies larger than this are refused with 413 before they are read any further.
    max_body_bytes: int = 64 * 1024
    # Requests per second per client for clients created without --rate-limit; None: unlimited.
    rate_limit: int | None = None
    # Commands per POST /v1/batches (at most MAX_BATCH_LIMIT). That route's body may hold
    # BATCH_BYTES_PER_COMMAND per command, plus max_body_bytes (batch_max_body_bytes).
    max_batch: int = 1000
    # Batches decided at once per process (each holds a connection of the commands' pool while it
    # runs); more wait their turn, at most command_timeout.
    batch_concurrency: int = 2
    # Seconds between keep-alive comments on an idle GET /v1/events/stream (proxies close quiet
    # connections; each also moves the stream's Last-Event-ID past events a filter left out).
    feed_heartbeat: float = 15.0
    # The key webhooks' signing secrets derive from (projections/webhooks.py); kept outside the
    # database. Unset: no webhooks (`make run` keeps one in TALLY_DATA_DIR/webhook-key).
    webhook_key: str | None = None
    # Where webhooks may point: `public` (any host with only public addresses, the default), host
    # names and `*.example.com` patterns (allowed whatever their addresses), comma-separated.
    webhook_allowed_hosts: str | None = None
    # Seconds a receiver has to answer; how long a delivery is retried before it is parked; the
    # first retry's delay (doubling, with jitter, up to an hour).
    webhook_timeout: float = 10.0
    webhook_retry_seconds: float = 86400.0
    webhook_backoff: float = 1.0

    @property
    def batch_max_body_bytes(self) -> int:
        return self.max_batch * BATCH_BYTES_PER_COMMAND + self.max_body_bytes


MAX_BATCH_LIMIT: Final = 10_000
BATCH_BYTES_PER_COMMAND: Final = 4096


def _parse(env: Mapping[str, str], name: str, convert: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not valid: {exc}") from None


def _positive(convert: Callable[[str], T]) -> Callable[[str], T]:
    def check(raw: str) -> T:
        value = convert(raw)
        if not value > 0:  # type: ignore[operator]
            raise ValueError("must be greater than zero")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    return check


def _at_most(limit: int) -> Callable[[str], int]:
    def check(raw: str) -> int:
        value = int(raw)
        if not 1 <= value <= limit:
            raise ValueError(f"must be 1 to {limit:,}")
        return value

    return check


def _seconds_up_to(limit: float) -> Callable[[str], float]:
    def check(raw: str) -> float:
        value = float(raw)
        if not 0 < value <= limit:  # (NaN fails too)
            raise ValueError(f"must be a number of seconds above 0, at most {limit:,g}")
        return value

    return check


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port, 0 to 65535")
    return value


def _log_level(raw: str) -> str:
    value = raw.lower()
    if value not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be one of debug, info, warning, error")
    return value


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in {"json", "console"}:
        raise ValueError("must be json or console")
    return value


def _role(raw: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", raw):
        raise ValueError("must be a PostgreSQL role name of [a-z0-9_], starting with a letter or _")
    return raw


def _boolean(raw: str) -> bool:
    value = raw.lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError("must be true or false")
    return value in {"true", "1", "yes"}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``env`` (default: the process environment), failing loudly."""
    env = os.environ if env is None else env
    d = Settings()
    settings = Settings(
        database_url=env.get("DATABASE_URL") or None,
        owner_database_url=env.get("TALLY_OWNER_DATABASE_URL") or None,
        app_role=_parse(env, "TALLY_APP_ROLE", _role, None),
        app_password=env.get("TALLY_APP_PASSWORD") or None,
        anchor_key=env.get("TALLY_ANCHOR_KEY") or None,
        host=env.get("HOST") or d.host,
        port=_parse(env, "PORT", _port, d.port),
        data_dir=_parse(env, "TALLY_DATA_DIR", Path, d.data_dir),
        pool_min_size=_parse(env, "TALLY_POOL_MIN_SIZE", _positive(int), d.pool_min_size),
        pool_max_size=_parse(env, "TALLY_POOL_MAX_SIZE", _positive(int), d.pool_max_size),
        read_pool_max_size=_parse(env, "TALLY_READ_POOL_MAX_SIZE", _positive(int), d.read_pool_max_size),
        command_concurrency=_parse(env, "TALLY_COMMAND_CONCURRENCY", _positive(int), d.command_concurrency),
        command_timeout=_parse(env, "TALLY_COMMAND_TIMEOUT", _positive(float), d.command_timeout),
        lock_timeout=_parse(env, "TALLY_LOCK_TIMEOUT", _positive(float), d.lock_timeout),
        command_queue=_parse(env, "TALLY_COMMAND_QUEUE", _positive(int), d.command_queue),
        read_timeout=_parse(env, "TALLY_READ_TIMEOUT", _positive(float), d.read_timeout),
        read_concurrency=_parse(env, "TALLY_READ_CONCURRENCY", _positive(int), d.read_concurrency),
        connect_timeout=_parse(env, "TALLY_CONNECT_TIMEOUT", _positive(float), d.connect_timeout),
        consistency_timeout=_parse(env, "TALLY_CONSISTENCY_TIMEOUT", _positive(float), d.consistency_timeout),
        projector_batch_size=_parse(
            env, "TALLY_PROJECTOR_BATCH_SIZE", _positive(int), d.projector_batch_size
        ),
        projector_poll_interval=_parse(
            env, "TALLY_PROJECTOR_POLL_INTERVAL", _positive(float), d.projector_poll_interval
        ),
        idle_in_transaction_timeout_ms=_parse(
            env, "TALLY_IDLE_IN_TRANSACTION_TIMEOUT_MS", _positive(int), d.idle_in_transaction_timeout_ms
        ),
        log_level=_parse(env, "TALLY_LOG_LEVEL", _log_level, d.log_level),
        log_format=_parse(env, "TALLY_LOG_FORMAT", _log_format, d.log_format),
        ready_max_lag_seconds=_parse(
            env, "TALLY_READY_MAX_LAG_SECONDS", _positive(float), d.ready_max_lag_seconds
        ),
        docs_public=_parse(env, "TALLY_DOCS_PUBLIC", _boolean, d.docs_public),
        rate_limit=_parse(env, "TALLY_RATE_LIMIT", _positive(int), d.rate_limit),
        max_body_bytes=_parse(env, "TALLY_MAX_BODY_BYTES", _positive(int), d.max_body_bytes),
        max_batch=_parse(env, "TALLY_MAX_BATCH", _at_most(MAX_BATCH_LIMIT), d.max_batch),
        batch_concurrency=_parse(env, "TALLY_BATCH_CONCURRENCY", _positive(int), d.batch_concurrency),
        feed_heartbeat=_parse(env, "TALLY_FEED_HEARTBEAT", _positive(float), d.feed_heartbeat),
        webhook_key=env.get("TALLY_WEBHOOK_KEY") or None,
        webhook_allowed_hosts=env.get("TALLY_WEBHOOK_ALLOWED_HOSTS") or None,
        webhook_timeout=_parse(env, "TALLY_WEBHOOK_TIMEOUT", _seconds_up_to(300), d.webhook_timeout),
        webhook_retry_seconds=_parse(
            env, "TALLY_WEBHOOK_RETRY_SECONDS", _seconds_up_to(30 * 86400), d.webhook_retry_seconds
        ),
        webhook_backoff=_parse(env, "TALLY_WEBHOOK_BACKOFF", _seconds_up_to(3600), d.webhook_backoff),
    )
    if settings.pool_min_size > settings.pool_max_size:
        raise SettingsError("TALLY_POOL_MIN_SIZE must not exceed TALLY_POOL_MAX_SIZE")
    if settings.lock_timeout >= settings.command_timeout:
        raise SettingsError("TALLY_LOCK_TIMEOUT must be shorter than TALLY_COMMAND_TIMEOUT")
    if 2 * settings.command_concurrency + settings.batch_concurrency + 2 > settings.pool_max_size:
        # Group batches and the retries of held wallets, up to TALLY_COMMAND_CONCURRENCY each, the
        # batches of POST /v1/batches, and two more for key checks, readiness and single commands.
        raise SettingsError(
            "TALLY_POOL_MAX_SIZE must be at least twice TALLY_COMMAND_CONCURRENCY, plus "
            "TALLY_BATCH_CONCURRENCY, plus 2"
        )
    return settings
