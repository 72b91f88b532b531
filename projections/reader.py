"""What a query needs of a connection: an asyncpg pool or connection, or the API's pools with
their waits bounded (api.database.BoundedPool)."""

from __future__ import annotations

from typing import Any, Protocol

import asyncpg


class Reader(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]: ...

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...

    async def execute(self, query: str, *args: Any) -> str: ...
