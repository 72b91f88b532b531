"""``tally keys``: create, list, revoke and rotate clients and their secrets (as the schema owner).

A secret is shown once, when it is made; only its SHA-256 is stored (api/auth.py).
"""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import datetime
from typing import Final

import asyncpg
import msgspec

from api.auth import ADMIN, SCOPES, SECRET_PREFIX, secret_hash, secret_id_of
from domain.values import ASSET_CODE_PATTERN, BEFORE_IDENTITIES_CLIENT, SEED_CLIENT

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ASSET: Final = re.compile(ASSET_CODE_PATTERN)
DEVELOPMENT_CLIENT: Final = "development"

_BUILT_IN: Final = [uuid.UUID(BEFORE_IDENTITIES_CLIENT), uuid.UUID(SEED_CLIENT)]
_CLIENTS: Final = """
SELECT c.client_id::text AS id, c.name, c.scopes, c.assets, c.rate_limit, c.created_at, c.expires_at,
       c.revoked_at,
       (SELECT count(*) FROM client_secrets s
         WHERE s.client_id = c.client_id AND (s.expires_at IS NULL OR s.expires_at > now())
           AND (c.expires_at IS NULL OR c.expires_at > now()) AND c.revoked_at IS NULL) AS live_secrets
  FROM clients c
"""


class KeysError(ValueError):
    """A ``tally keys`` request that cannot be carried out; the message says why."""


class ClientInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    scopes: list[str]
    assets: list[str] | None  # None: every asset
    rate_limit: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    live_secrets: int


class CreatedKey(msgspec.Struct, frozen=True, kw_only=True):
    """A client and its new secret, the only time the secret is shown."""

    id: str
    name: str
    scopes: list[str]
    assets: list[str] | None
    rate_limit: int | None
    secret: str
    created_at: datetime
    expires_at: datetime | None


def new_secret() -> tuple[str, str]:
    """(secret id, secret): ``tally_sk_<16 hex>_<43 base64url>`` (256 random bits)."""
    secret_id = secrets.token_hex(8)
    return secret_id, f"{SECRET_PREFIX}{secret_id}_{secrets.token_urlsafe(32)}"


def parse_scopes(raw: str) -> list[str]:
    scopes = sorted({s.strip() for s in raw.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise KeysError(
            f"unknown scope(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(SCOPES)}"
        )
    return scopes


def parse_assets(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    assets = sorted({a.strip() for a in raw.split(",") if a.strip()})
    bad = [a for a in assets if not _ASSET.fullmatch(a)]
    if not assets or bad:
        raise KeysError(
            f"asset codes are 2-16 characters of [A-Z0-9_], starting with a letter: {bad or raw!r}"
        )
    return assets


async def _info(conn: asyncpg.Connection, name: str) -> ClientInfo | None:
    row = await conn.fetchrow(_CLIENTS + " WHERE c.name = $1", name)
    return None if row is None else ClientInfo(**dict(row))


async def list_clients(conn: asyncpg.Connection) -> list[ClientInfo]:
    rows = await conn.fetch(_CLIENTS + " WHERE c.client_id <> ALL ($1) ORDER BY c.name", _BUILT_IN)
    return [ClientInfo(**dict(r)) for r in rows]


async def _add_secret(conn: asyncpg.Connection, client_id: str) -> str:
    secret_id, secret = new_secret()
    await conn.execute(
        "INSERT INTO client_secrets (secret_id, client_id, secret_hash) VALUES ($1, $2, $3)",
        secret_id, uuid.UUID(client_id), secret_hash(secret),
    )  # fmt: skip
    return secret


async def create_client(
    conn: asyncpg.Connection,
    name: str,
    scopes: list[str],
    *,
    assets: list[str] | None = None,
    rate_limit: int | None = None,
    expires_in_days: float | None = None,
) -> CreatedKey:
    if not _NAME.fullmatch(name):
        raise KeysError(
            "a client's name is 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit"
        )
    if rate_limit is not None and rate_limit < 1:
        raise KeysError("--rate-limit must be at least 1 request per second")
    if expires_in_days is not None and not expires_in_days > 0:
        raise KeysError("--expires-in must be a positive number of days")
    async with conn.transaction():
        row = await conn.fetchrow(
            """INSERT INTO clients (client_id, name, scopes, assets, rate_limit, expires_at)
               VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
               ON CONFLICT (name) DO NOTHING
               RETURNING client_id::text AS id, created_at, expires_at""",
            uuid.uuid4(), name, scopes, assets, rate_limit,
            None if expires_in_days is None else expires_in_days * 86400,
        )  # fmt: skip
        if row is None:
            raise KeysError(f"a client named {name} exists already (rotate its secret, or revoke it)")
        secret = await _add_secret(conn, row["id"])
    return CreatedKey(
        id=row["id"], name=name, scopes=scopes, assets=assets, rate_limit=rate_limit, secret=secret,
        created_at=row["created_at"], expires_at=row["expires_at"],
    )  # fmt: skip


async def revoke_client(conn: asyncpg.Connection, name: str) -> ClientInfo:
    """Every secret of the client fails from now on (within the API's cache time). Its name stays
    taken: it names its commands' namespace and their ``created_by``."""
    await conn.execute("UPDATE clients SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL", name)
    info = await _info(conn, name)
    if info is None:
        raise KeysError(f"no client named {name}")
    return info


async def rotate_client(conn: asyncpg.Connection, name: str, grace_seconds: float) -> CreatedKey:
    """A new secret; the live one keeps working for ``grace_seconds``. A secret still in an earlier
    rotation's grace ends now: a client holds at most two live secrets."""
    if grace_seconds < 0:
        raise KeysError("--grace must be zero or more seconds")
    async with conn.transaction():
        client = await conn.fetchrow(
            "SELECT client_id::text AS id, revoked_at, expires_at <= now() AS expired FROM clients "
            "WHERE name = $1 FOR UPDATE",
            name,
        )
        if client is None:
            raise KeysError(f"no client named {name}")
        if client["revoked_at"] is not None or client["expired"]:
            raise KeysError(f"client {name} is revoked or expired: create a new client instead")
        client_id = uuid.UUID(client["id"])
        await conn.execute(
            "UPDATE client_secrets SET expires_at = now() WHERE client_id = $1 AND expires_at > now()",
            client_id,
        )
        await conn.execute(
            "UPDATE client_secrets SET expires_at = now() + make_interval(secs => $2) "
            "WHERE client_id = $1 AND expires_at IS NULL",
            client_id, float(grace_seconds),
        )  # fmt: skip
        secret = await _add_secret(conn, client["id"])
        info = await _info(conn, name)
    assert info is not None
    return CreatedKey(
        id=info.id, name=info.name, scopes=info.scopes, assets=info.assets, rate_limit=info.rate_limit,
        secret=secret, created_at=info.created_at, expires_at=info.expires_at,
    )  # fmt: skip


async def adopt_earlier_keys(conn: asyncpg.Connection, name: str) -> int:
    """Give the commands recorded before callers had identities to client ``name``: its retries of
    them replay (their stored fingerprints are the bare requests', tally_replay). For the one
    service that called Tally before keys existed; once done, they are that client's for good.
    Returns how many commands it adopted."""
    async with conn.transaction():
        client = await conn.fetchval("SELECT client_id FROM clients WHERE name = $1", name)
        if client is None or str(client) in {BEFORE_IDENTITIES_CLIENT, SEED_CLIENT}:
            raise KeysError(f"no client named {name} that could adopt keys")
        try:
            adopted: int = await conn.fetchval(
                "WITH moved AS (UPDATE commands SET client_id = $1 WHERE client_id = $2 RETURNING 1) "
                "SELECT count(*) FROM moved",
                client, uuid.UUID(BEFORE_IDENTITIES_CLIENT),
            )  # fmt: skip
        except asyncpg.UniqueViolationError:
            raise KeysError(
                f"client {name} has already used some of the keys recorded before callers had identities: "
                "adopt them with a client that has not"
            ) from None
    return adopted


async def development_key(conn: asyncpg.Connection, kept: str | None) -> str:
    """The development client's secret (every scope): ``kept`` (the one made before) while the
    database accepts it; else a new one (a new database, or the file that kept it is gone)."""
    if kept is not None:
        secret = kept
        secret_id = secret_id_of(secret)
        if secret_id is not None:
            stored = await conn.fetchval(
                "SELECT s.secret_hash FROM client_secrets s JOIN clients c USING (client_id) "
                "WHERE s.secret_id = $1 AND c.revoked_at IS NULL AND s.expires_at IS NULL",
                secret_id,
            )
            if stored is not None and bytes(stored) == secret_hash(secret):
                return secret
    if await _info(conn, DEVELOPMENT_CLIENT) is None:
        secret = (await create_client(conn, DEVELOPMENT_CLIENT, [ADMIN])).secret
    else:
        secret = (await rotate_client(conn, DEVELOPMENT_CLIENT, 0)).secret
    return secret
