"""Webhook subscriptions (migrations/0012_webhooks.sql): a client's own, their signing secrets,
where each may point, and the signed requests the dispatcher sends (projections/dispatcher.py).

A subscription's secret is never stored: only a random salt is, and the secret is
HMAC-SHA256(TALLY_WEBHOOK_KEY, salt), shown once (and again to a replay of the request that made
it). A copy of the database cannot sign a delivery; the key lives outside it, as the anchor key
does. Deliveries are signed as Standard Webhooks 1.0 prescribes, by the ``standardwebhooks``
package (the reference implementation), with every live secret during a rotation's grace period.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
from standardwebhooks import Webhook as StandardWebhook

from domain import EVENT_TYPES
from projections.feed import FeedEvent
from projections.positions import ORIGIN, Position
from projections.reader import Reader

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (a prefix, not a secret)
_DERIVATION: Final = b"tally webhook secret\x00"
DEFAULT_GRACE: Final = 24 * 3600.0  # seconds a rotated secret keeps signing
MAX_GRACE: Final = 7 * 24 * 3600.0


class WebhookNotFound(LookupError):
    code = "webhook_not_found"


class WebhookKeyReused(Exception):
    """The Idempotency-Key was used for another request of this kind."""

    code = "idempotency_key_reused"


class WebhooksNotConfigured(Exception):
    code = "webhooks_not_configured"


class UrlNotAllowed(ValueError):
    code = "url_not_allowed"


def derive_secret(key: bytes, salt: bytes) -> str:
    """The signing secret of ``salt`` under the service's webhook key, ``whsec_<base64>``."""
    return (
        SECRET_PREFIX + base64.b64encode(hmac.new(key, _DERIVATION + salt, hashlib.sha256).digest()).decode()
    )


def sign(secrets: list[str], message_id: str, at: datetime, body: str) -> dict[str, str]:
    """Standard Webhooks' headers for ``body``: one ``v1,<signature>`` per secret, space-separated."""
    signatures = " ".join(StandardWebhook(secret).sign(message_id, at, body) for secret in secrets)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
    }


PUBLIC: Final = "public"
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
# Not global, though Python 3.11 says they are: local-use NAT64 (RFC 8215) and site-local.
_NOT_PUBLIC: Final = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A public address, and, for an IPv6 one that carries an IPv4 address (mapped, 6to4, Teredo,
    NAT64, IPv4-compatible), the IPv4 address it carries too."""
    if not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NOT_PUBLIC):
            return False
        carried = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in _NAT64 or int(address) >> 32 == 0:
            carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(_public(v4) for v4 in carried if v4 is not None)
    return True


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """Where webhooks may point (TALLY_WEBHOOK_ALLOWED_HOSTS, comma-separated). ``public``: any host
    whose every address is public (no loopback, private, link-local or reserved address: a webhook
    must not reach into the service's own network); the default. Any other entry: a host name or a
    ``*.example.com`` pattern (``*``: any host) allowed whatever its addresses, as an operator who
    lists ``localhost`` means it (`make run` allows ``public,localhost,127.0.0.1``). Checked when a
    subscription is made and again before each delivery."""

    allowed: tuple[str, ...] = (PUBLIC,)

    @classmethod
    def parse(cls, value: str | None) -> HostPolicy:
        if value is None or not value.strip():
            return cls()
        return cls(tuple(entry.strip().lower() for entry in value.split(",") if entry.strip()))

    async def check(self, url: str) -> None:
        """UrlNotAllowed unless ``url`` is an http(s) URL this policy lets webhooks reach now."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            port = parts.port
        except ValueError as exc:
            raise UrlNotAllowed(f"{url!r} is not a URL: {exc}") from None
        if parts.scheme not in {"http", "https"} or not host:
            raise UrlNotAllowed(f"{url!r} is not an http or https URL")
        if parts.username or parts.password:
            raise UrlNotAllowed("a webhook URL may not carry credentials")
        try:
            httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as exc:
            raise UrlNotAllowed(f"{url!r} is not a URL a request can be sent to: {exc}") from None
        if any(fnmatch.fnmatchcase(host, pattern) for pattern in self.allowed if pattern != PUBLIC):
            return
        if PUBLIC not in self.allowed:
            raise UrlNotAllowed(f"host {host} is not in TALLY_WEBHOOK_ALLOWED_HOSTS")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError, ValueError) as exc:
            raise UrlNotAllowed(f"host {host} does not resolve: {exc}") from None
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
            if not _public(address):
                raise UrlNotAllowed(
                    f"host {host} resolves to {address}, which is not a public address "
                    "(list the host in TALLY_WEBHOOK_ALLOWED_HOSTS to allow it)"
                )


class SecretInfo(msgspec.Struct, frozen=True, kw_only=True):
    created_at: datetime
    expires_at: datetime | None  # None: the current secret


class WebhookView(msgspec.Struct, frozen=True, kw_only=True):
    webhook_id: str
    url: str
    types: list[str] | None  # None: every event type
    description: str | None
    created_at: datetime
    secrets: list[SecretInfo]
    pending: int  # deliveries not acknowledged yet
    parked: int  # deliveries given up on after the retry period
    attempts: int  # every attempt to deliver since the subscription was made
    failures: int  # attempts that failed


class WebhookCreated(msgspec.Struct, frozen=True, kw_only=True):
    webhook_id: str
    url: str
    types: list[str] | None
    description: str | None
    secret: str  # shown once: the signing secret (Standard Webhooks' whsec_ form)
    created_at: datetime


class SecretRotated(msgspec.Struct, frozen=True, kw_only=True):
    webhook_id: str
    secret: str
    previous_expires_at: datetime  # until then, deliveries carry both signatures


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    cursor: str
    stream_id: str
    status: str  # pending, delivered or parked
    attempts: int
    enqueued_at: datetime
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None  # when pending
    last_status: int | None  # the receiver's last HTTP status; None: no answer
    last_error: str | None
    delivered_at: datetime | None


class DeliveryPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Delivery]
    next_cursor: str | None  # pass as cursor for older deliveries


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    webhook_id: str
    after: str  # deliveries of the events after this cursor are sent again
    replayed: int  # deliveries set pending again (events not enqueued yet follow as usual)


def _fingerprint(*parts: object) -> bytes:
    return hashlib.sha256(msgspec.json.encode(parts)).digest()


def validate_types(types: list[str] | None) -> list[str] | None:
    if types is None:
        return None
    unknown = sorted({t for t in types if t not in EVENT_TYPES})
    if unknown or not types:
        raise ValueError(
            f"unknown event types {', '.join(unknown) or '(none given)'}; known: {', '.join(EVENT_TYPES)}"
        )
    return sorted(set(types))


# The feed's head: the last event a reader may see now (projections/feed.py); a new subscription's
# deliveries start after it.
_HEAD = """
SELECT writer_xid::text AS xid, global_position FROM events
 WHERE writer_xid < tally_finished_below() ORDER BY writer_xid DESC, global_position DESC LIMIT 1
"""
_CREATE = """
INSERT INTO webhooks (webhook_id, client_id, url, types, description, create_key, fingerprint, cursor_xid,
                      cursor_position)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::xid8, $9)
ON CONFLICT (client_id, create_key) DO NOTHING
RETURNING created_at
"""
_BY_KEY = """
SELECT w.webhook_id::text AS webhook_id, w.url, w.types, w.description, w.created_at, w.fingerprint,
       (SELECT s.salt FROM webhook_secrets s
         WHERE s.webhook_id = w.webhook_id AND s.rotate_key IS NULL) AS salt
  FROM webhooks w WHERE w.client_id = $1 AND w.create_key = $2
"""
_VIEW = """
SELECT w.webhook_id::text AS webhook_id, w.url, w.types, w.description, w.created_at,
       (SELECT coalesce(array_agg(s.created_at ORDER BY s.created_at), '{}') FROM webhook_secrets s
         WHERE s.webhook_id = w.webhook_id AND (s.expires_at IS NULL OR s.expires_at > now())) AS secrets_at,
       (SELECT coalesce(array_agg(s.expires_at ORDER BY s.created_at), '{}') FROM webhook_secrets s
         WHERE s.webhook_id = w.webhook_id AND (s.expires_at IS NULL OR s.expires_at > now()))
           AS secrets_until,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.webhook_id = w.webhook_id AND d.status = 'pending')
           AS pending,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.webhook_id = w.webhook_id AND d.status = 'parked')
           AS parked,
       w.attempts, w.failures
  FROM webhooks w
 WHERE w.client_id = $1 AND w.deleted_at IS NULL AND ($2::uuid IS NULL OR w.webhook_id = $2)
 ORDER BY w.created_at, w.webhook_id
"""


def _view(row: asyncpg.Record) -> WebhookView:
    return WebhookView(
        webhook_id=row["webhook_id"],
        url=row["url"],
        types=None if row["types"] is None else list(row["types"]),
        description=row["description"],
        created_at=row["created_at"],
        secrets=[
            SecretInfo(created_at=a, expires_at=u)
            for a, u in zip(row["secrets_at"], row["secrets_until"], strict=True)
        ],
        pending=row["pending"],
        parked=row["parked"],
        attempts=row["attempts"],
        failures=row["failures"],
    )


def _id(webhook_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(webhook_id)
    except ValueError:
        raise WebhookNotFound(f"no webhook {webhook_id}") from None


async def create_webhook(
    pool: asyncpg.Pool,
    key: bytes | None,
    client_id: str,
    idempotency_key: str,
    url: str,
    types: list[str] | None,
    description: str | None,
) -> tuple[WebhookCreated, bool]:
    """The subscription (and whether this was a replay of the request that made it)."""
    if key is None:
        raise WebhooksNotConfigured(
            "webhooks need TALLY_WEBHOOK_KEY, the key their signing secrets derive from"
        )
    fingerprint = _fingerprint(url, types, description)
    async with pool.acquire() as conn, conn.transaction():
        head = await conn.fetchrow(_HEAD)
        cursor = ORIGIN if head is None else Position(int(head["xid"]), head["global_position"])
        webhook_id = uuid.uuid4()
        created_at = await conn.fetchval(
            _CREATE, webhook_id, uuid.UUID(client_id), url, types, description, idempotency_key, fingerprint,
            str(cursor.xid), cursor.position,
        )  # fmt: skip
        if created_at is not None:
            salt = os.urandom(32)
            await conn.execute(
                "INSERT INTO webhook_secrets (webhook_id, salt) VALUES ($1, $2)", webhook_id, salt
            )
            made = WebhookCreated(
                webhook_id=str(webhook_id), url=url, types=types, description=description,
                secret=derive_secret(key, salt), created_at=created_at,
            )  # fmt: skip
            return made, False
        prior = await conn.fetchrow(_BY_KEY, uuid.UUID(client_id), idempotency_key)
    assert prior is not None
    if bytes(prior["fingerprint"]) != fingerprint:
        raise WebhookKeyReused("this Idempotency-Key made another webhook")
    again = WebhookCreated(
        webhook_id=prior["webhook_id"], url=prior["url"],
        types=None if prior["types"] is None else list(prior["types"]), description=prior["description"],
        secret=derive_secret(key, bytes(prior["salt"])), created_at=prior["created_at"],
    )  # fmt: skip
    return again, True


async def list_webhooks(reader: Reader, client_id: str) -> list[WebhookView]:
    return [_view(row) for row in await reader.fetch(_VIEW, uuid.UUID(client_id), None)]


async def get_webhook(reader: Reader, client_id: str, webhook_id: str) -> WebhookView:
    rows = await reader.fetch(_VIEW, uuid.UUID(client_id), _id(webhook_id))
    if not rows:
        raise WebhookNotFound(f"no webhook {webhook_id}")
    return _view(rows[0])


async def delete_webhook(pool: asyncpg.Pool, client_id: str, webhook_id: str) -> None:
    """No more deliveries (those pending stay, as they were, in its deliveries)."""
    deleted = await pool.fetchval(
        "UPDATE webhooks SET deleted_at = now() "
        "WHERE client_id = $1 AND webhook_id = $2 AND deleted_at IS NULL "
        "RETURNING webhook_id",
        uuid.UUID(client_id), _id(webhook_id),
    )  # fmt: skip
    if deleted is None:
        raise WebhookNotFound(f"no webhook {webhook_id}")


async def _owned(conn: Reader, client_id: str | None, webhook_id: str) -> uuid.UUID:
    """The webhook's id, its row locked; WebhookNotFound unless it is live (and ``client_id``'s)."""
    found = await conn.fetchval(
        "SELECT webhook_id FROM webhooks WHERE webhook_id = $1 AND deleted_at IS NULL "
        "AND ($2::uuid IS NULL OR client_id = $2) FOR UPDATE",
        _id(webhook_id), None if client_id is None else uuid.UUID(client_id),
    )  # fmt: skip
    if found is None:
        raise WebhookNotFound(f"no webhook {webhook_id}")
    return uuid.UUID(str(found))


async def rotate_secret(
    pool: asyncpg.Pool, key: bytes | None, client_id: str, webhook_id: str, idempotency_key: str, grace: float
) -> tuple[SecretRotated, bool]:
    """A new current secret; the previous one signs too for ``grace`` seconds more."""
    if key is None:
        raise WebhooksNotConfigured(
            "webhooks need TALLY_WEBHOOK_KEY, the key their signing secrets derive from"
        )
    fingerprint = _fingerprint(grace)
    async with pool.acquire() as conn, conn.transaction():
        wid = await _owned(conn, client_id, webhook_id)
        prior = await conn.fetchrow(
            "SELECT salt, fingerprint, (SELECT max(expires_at) FROM webhook_secrets p "
            "WHERE p.webhook_id = $1 AND p.created_at < s.created_at) AS until "
            "FROM webhook_secrets s WHERE webhook_id = $1 AND rotate_key = $2",
            wid, idempotency_key,
        )  # fmt: skip
        if prior is not None:
            if bytes(prior["fingerprint"]) != fingerprint:
                raise WebhookKeyReused("this Idempotency-Key made another rotation")
            again = SecretRotated(
                webhook_id=str(wid),
                secret=derive_secret(key, bytes(prior["salt"])),
                previous_expires_at=prior["until"],
            )
            return again, True
        # Every secret still signing stops within the grace (one still in an earlier grace too).
        until = await conn.fetchval(
            "WITH ended AS (UPDATE webhook_secrets "
            "SET expires_at = least(coalesce(expires_at, 'infinity'), now() + make_interval(secs => $2)) "
            "WHERE webhook_id = $1 AND (expires_at IS NULL OR expires_at > now()) RETURNING expires_at) "
            "SELECT max(expires_at) FROM ended",
            wid, grace,
        )  # fmt: skip
        salt = os.urandom(32)
        await conn.execute(
            "INSERT INTO webhook_secrets (webhook_id, salt, rotate_key, fingerprint) VALUES ($1, $2, $3, $4)",
            wid, salt, idempotency_key, fingerprint,
        )  # fmt: skip
    return SecretRotated(
        webhook_id=str(wid), secret=derive_secret(key, salt), previous_expires_at=until
    ), False


_RESET = """
UPDATE webhook_deliveries
   SET status = 'pending', attempts = 0, first_attempt_at = NULL, last_attempt_at = NULL,
       next_attempt_at = now(),
       last_status = NULL, last_error = NULL, delivered_at = NULL, enqueued_at = now()
 WHERE webhook_id = $1 AND (writer_xid, global_position) > ($2::text::xid8, $3)
"""


async def replay(
    pool: asyncpg.Pool, client_id: str | None, webhook_id: str, after: Position, idempotency_key: str
) -> tuple[Replayed, bool]:
    """Send again every event after ``after`` that the subscription wants: its deliveries after it
    are set pending again, and its enqueue cursor moves back to ``after`` if it stood later."""
    fingerprint = _fingerprint(after.token())
    async with pool.acquire() as conn, conn.transaction():
        wid = await _owned(conn, client_id, webhook_id)
        prior = await conn.fetchrow(
            "SELECT fingerprint, after_xid::text AS xid, after_position, replayed FROM webhook_replays "
            "WHERE webhook_id = $1 AND replay_key = $2",
            wid, idempotency_key,
        )  # fmt: skip
        if prior is not None:
            if bytes(prior["fingerprint"]) != fingerprint:
                raise WebhookKeyReused("this Idempotency-Key asked for another replay")
            token = Position(int(prior["xid"]), prior["after_position"]).token()
            return Replayed(webhook_id=str(wid), after=token, replayed=prior["replayed"]), True
        status = await conn.execute(_RESET, wid, str(after.xid), after.position)
        count = int(status.split()[-1])
        await conn.execute(
            "UPDATE webhooks SET cursor_xid = $2::text::xid8, cursor_position = $3 WHERE webhook_id = $1 "
            "AND (cursor_xid, cursor_position) > ($2::text::xid8, $3)",
            wid, str(after.xid), after.position,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO webhook_replays "
            "(webhook_id, replay_key, fingerprint, after_xid, after_position, replayed) "
            "VALUES ($1, $2, $3, $4::text::xid8, $5, $6)",
            wid, idempotency_key, fingerprint, str(after.xid), after.position, count,
        )  # fmt: skip
    return Replayed(webhook_id=str(wid), after=after.token(), replayed=count), False


_DELIVERIES = """
SELECT d.event_id::text AS event_id, d.writer_xid::text AS xid, d.global_position, d.stream_id, d.status,
       d.attempts, d.enqueued_at, d.first_attempt_at, d.last_attempt_at,
       CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at, d.last_status,
       d.last_error,
       d.delivered_at
  FROM webhook_deliveries d
 WHERE d.webhook_id = $1 AND ($2::text IS NULL OR d.status = $2)
   AND (d.writer_xid, d.global_position) < ($3::text::xid8, $4)
 ORDER BY d.writer_xid DESC, d.global_position DESC
 LIMIT $5
"""
_NEWEST: Final = Position(2**64 - 1, 2**63 - 1)


async def deliveries(
    reader: Reader, client_id: str, webhook_id: str, status: str | None, limit: int, before: Position | None
) -> DeliveryPage:
    """The subscription's deliveries, newest event first; ``before``: a previous page's next_cursor."""
    await get_webhook(reader, client_id, webhook_id)
    start = before or _NEWEST
    rows = await reader.fetch(_DELIVERIES, _id(webhook_id), status, str(start.xid), start.position, limit)
    items = [
        Delivery(
            event_id=r["event_id"],
            cursor=f"{r['xid']}.{r['global_position']}",
            stream_id=r["stream_id"],
            status=r["status"],
            attempts=r["attempts"],
            enqueued_at=r["enqueued_at"],
            first_attempt_at=r["first_attempt_at"],
            last_attempt_at=r["last_attempt_at"],
            next_attempt_at=r["next_attempt_at"],
            last_status=r["last_status"],
            last_error=r["last_error"],
            delivered_at=r["delivered_at"],
        )
        for r in rows
    ]
    return DeliveryPage(items=items, next_cursor=items[-1].cursor if len(items) == limit else None)


class WebhookHealth(msgspec.Struct, frozen=True, kw_only=True):
    webhook_id: str
    pending: int
    parked: int
    attempts: int
    failures: int
    lag_seconds: float  # age of the oldest event it has not acknowledged yet (0: none)


# Only pending and parked deliveries are read (partial indexes), and the first event after the
# subscription's cursor: the lag counts events not enqueued yet too (a dispatcher that is down).
_HEALTH = """
SELECT w.webhook_id::text AS webhook_id,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.webhook_id = w.webhook_id AND d.status = 'pending')
           AS pending,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.webhook_id = w.webhook_id AND d.status = 'parked')
           AS parked,
       w.attempts, w.failures,
       coalesce(extract(epoch FROM now() - least(
           (SELECT min(e.recorded_at) FROM webhook_deliveries d JOIN events e USING (global_position)
             WHERE d.webhook_id = w.webhook_id AND d.status = 'pending'),
           (SELECT e.recorded_at FROM events e
             WHERE (e.writer_xid, e.global_position) > (w.cursor_xid, w.cursor_position)
             ORDER BY e.writer_xid, e.global_position LIMIT 1))), 0)::float8 AS lag_seconds
  FROM webhooks w JOIN clients c USING (client_id)
 WHERE w.deleted_at IS NULL AND c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now())
"""


async def webhook_health(reader: Reader) -> list[WebhookHealth]:
    """Every live subscription's delivery backlog, for the metrics."""
    return [WebhookHealth(**dict(row)) for row in await reader.fetch(_HEALTH)]


def delivery_body(event: FeedEvent) -> str:
    """What a delivery carries: the event as the feed serves it."""
    return msgspec.json.encode(event).decode()


def now() -> datetime:
    return datetime.now(UTC)


def backoff(attempts: int, first: float, cap: float = 3600.0) -> timedelta:
    """Exponential backoff with jitter after ``attempts`` failed attempts (half to all of
    first * 2^(attempts - 1), at most ``cap``)."""
    import random

    ceiling = min(cap, first * 2 ** min(max(0, attempts - 1), 40))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))  # noqa: S311 (jitter, not a secret)
