"""A deliberately tiny HTTP/1.1 keep-alive client for the load generator.

The benchmark shares two cores between the server, PostgreSQL and the load generator, so every
microsecond the generator spends is taken from the system under test. A general-purpose client
(httpx, aiohttp) costs several times more per request than the server's own parsing; this one
writes pre-serialized request bytes to one persistent connection and reads back only the status
line, the headers block and ``Content-Length`` bytes of body. It speaks exactly the subset of
HTTP/1.1 that uvicorn (httptools) answers Tally's requests with, and handles ``Connection: close``
and chunked bodies only so that a surprise shows up as a counted error rather than a hang.
"""

from __future__ import annotations

import asyncio
from typing import Final

_HEADERS_END: Final = b"\r\n\r\n"
_CONTENT_LENGTH: Final = b"\r\ncontent-length:"
_CHUNKED: Final = b"\r\ntransfer-encoding: chunked"
_CLOSE: Final = b"\r\nconnection: close"


class ProtocolError(Exception):
    """The server answered something this client does not parse (counted as an error)."""


def build_request(method: str, target: str, *, host: str, headers: dict[str, str], body: bytes) -> bytes:
    """One complete HTTP/1.1 request as bytes (used where requests are not on the hot path)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpConnection:
    """One keep-alive connection to ``host:port``; one request in flight at a time.

    ``request`` (re)connects lazily, so after any failure the caller just counts the error and
    calls again: the broken connection is dropped and the next request opens a fresh one.
    """

    __slots__ = ("_host", "_port", "_reader", "_writer", "connects")

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one pre-serialized request; return (status, body). Raises on I/O or protocol errors
        after dropping the connection."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
            self.connects += 1
        reader = self._reader
        assert reader is not None
        try:
            self._writer.write(data)
            head = await reader.readuntil(_HEADERS_END)
            status = int(head[9:12])
            lowered = head.lower()
            body = await _read_body(reader, status, lowered)
            if _CLOSE in lowered:
                self.close()
        except BaseException:
            self.close()
            raise
        return status, body

    def close(self) -> None:
        """Drop the connection (idempotent); the next request reconnects."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def _read_body(reader: asyncio.StreamReader, status: int, lowered_head: bytes) -> bytes:
    start = lowered_head.find(_CONTENT_LENGTH)
    if start >= 0:
        start += len(_CONTENT_LENGTH)
        end = lowered_head.index(b"\r\n", start)
        return await reader.readexactly(int(lowered_head[start:end]))
    if _CHUNKED in lowered_head:
        return await _read_chunked(reader)
    if status in {204, 304} or 100 <= status < 200:
        return b""
    raise ProtocolError(f"HTTP {status} response without Content-Length")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected: the empty line
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
