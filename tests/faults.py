"""Fault-test infrastructure: a PostgreSQL cluster a test owns (and may stop, crash and restart), a TCP
proxy that can stall or reset the network path, `tally serve` processes with their own environment
(tests.conftest.serving), and a load recorder with the checkers a fault test ends with.

The usual shape of a fault test::

    async with own_cluster(tmp_path) as cluster, TcpProxy.to_url(cluster.url) as proxy:
        async with serving(proxy.url_via(cluster.url), env={...}) as api:
            await open_wallets(api.url, USERS)
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(api.url, USERS, until=stop))
            ...  # the fault: proxy.stall(), cluster.restart(mode="immediate"), sigkill(api.process)
            stop.set()
            record = await load
        async with serving(cluster.url) as again:
            report = await check_load(record, base_url=again.url, owner_url=cluster.url)

Nothing here sleeps hoping to land in a window: faults are staged (a held lock, a stalled proxy) and
waits are bounded polls of what is observable, never timing assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx

from api.database import with_user
from api.migrate import migrate
from tests.conftest import LiveServer, serving
from tests.helpers import APP_ROLE, AUTH, TEST_CLIENT_ID, add_test_client

__all__ = [
    "Attempt",
    "Cluster",
    "Latency",
    "LiveServer",
    "LoadRecord",
    "LoadReport",
    "ReplayReport",
    "StopMode",
    "TcpProxy",
    "check_acknowledged",
    "check_load",
    "check_replays",
    "check_verify",
    "free_port",
    "open_wallets",
    "own_cluster",
    "run_load",
    "serving",
    "sessions_gone",
    "sigkill",
    "url_via",
]

StopMode = Literal["smart", "fast", "immediate"]


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' local ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing uses now, below the kernel's ephemeral range: a server that stops and
    starts again on it (a restarted cluster, an API process on ``serving(port=...)``) would
    otherwise find it taken meanwhile by some outgoing connection's local port (seen: ``pg_ctl
    start`` failing with "could not bind ... Address already in use" after a restart)."""
    low = _ephemeral_ports()[0]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 16384), low)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} on {host}")


def url_via(url: str, host: str, port: int) -> str:
    """``url`` (a PostgreSQL URL) reaching ``host:port`` instead, with its login, database and other
    options kept (a ``host``/``port`` query parameter, which would win over the netloc, is dropped)."""
    parts = urlsplit(url)
    login = parts.netloc.rpartition("@")[0]
    netloc = (login + "@" if login else "") + f"{host}:{port}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in {"host", "port"}])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# --------------------------------------------------------------------------------------------------
# A PostgreSQL cluster of the test's own


def _pg_bin() -> Path:
    """The PostgreSQL binaries the ``pgserver`` package bundles (found without importing it)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("the pgserver package (a dev dependency) is not installed")
    return Path(spec.origin).parent / "pginstall" / "bin"


_SYSTEM_USER = "pgserver"  # PostgreSQL refuses to run as root; pgserver's own choice of user


def _system_user() -> str | None:
    """The OS user the cluster runs as: this process's, or (as root) pgserver's unprivileged user."""
    return _SYSTEM_USER if os.geteuid() == 0 else None


def _hand_over(directory: Path, user: str) -> None:
    """Let ``user`` run PostgreSQL in ``directory``, as pgserver does when run as root: the
    directory's parents become traversable, the directory and the binaries readable."""
    import pwd
    import stat

    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(user)
    ensure_prefix_permissions(directory)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(_pg_bin(), readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(_pg_bin().parent / "lib", readable)
    entry = pwd.getpwnam(user)
    os.chown(directory, entry.pw_uid, entry.pw_gid)


_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes, with the NUL


class Cluster:
    """A PostgreSQL cluster this test owns (``own_cluster``): its own data directory, postmaster and
    TCP port on 127.0.0.1, trust authentication, its unix socket in its own directory. ``stop``,
    ``start`` and ``restart`` run the real ``pg_ctl``: the postmaster goes away (``immediate``: a
    crash, recovered from WAL on the next start) and comes back on the same port."""

    def __init__(self, directory: Path, port: int, socket_dir: Path, database: str) -> None:
        self.directory = directory
        self.pgdata = directory / "data"
        self.log = directory / "server.log"
        self.port = port
        self.host = "127.0.0.1"
        self.socket_dir = socket_dir
        self.database = database
        self.user = "postgres"

    @property
    def url(self) -> str:
        """The database, as the cluster's superuser (the schema owner: migrate, verify, probes)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def app_url(self) -> str:
        """The database as the application's least-privileged role (what `tally serve` logs in as)."""
        return with_user(self.url, APP_ROLE, None)

    @property
    def admin_url(self) -> str:
        """The ``postgres`` maintenance database, as the superuser."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid (the first line of postmaster.pid), or None when stopped."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    async def _run(self, program: str, *args: str) -> None:
        """One PostgreSQL program, as the cluster's OS user; its output goes to ctl.log (a pipe
        would be inherited by the postmaster pg_ctl starts, and never close)."""
        ctl_log = self.directory / "ctl.log"
        with ctl_log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                str(_pg_bin() / program), *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, user=_system_user(),
            )  # fmt: skip
            try:
                code = await asyncio.wait_for(process.wait(), 120)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
        if code != 0:
            server_log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} exited {code}:\n{ctl_log.read_text(errors='replace')[-4000:]}"
                f"\n--- server log ---\n{server_log}"
            )

    async def _initdb(self) -> None:
        await self._run(
            "initdb", "-D", str(self.pgdata), "-U", self.user, "--auth=trust", "--encoding=UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        self._configure()

    def _configure(self) -> None:
        """Where the server listens (appended: the last setting of a name wins)."""
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tests/faults.py\n"
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 200\n"
            )

    async def _first_start(self) -> None:
        """Start on the port picked; should another process have taken it since, on another."""
        for _ in range(5):
            logged = self.log.stat().st_size if self.log.exists() else 0
            try:
                await self.start()
            except RuntimeError:
                with self.log.open("rb") as log:
                    log.seek(logged)
                    if b"could not bind" not in log.read():
                        raise
                self.port = free_port()
                self._configure()
            else:
                return
        raise RuntimeError(f"no free port for the cluster in {self.directory}")

    async def start(self) -> None:
        """Start the postmaster (``pg_ctl start -w``: it accepts connections when this returns)."""
        await self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "60", "start")

    async def stop(self, mode: StopMode = "fast") -> None:
        """Stop the postmaster (``pg_ctl stop -m mode -w``). ``fast`` rolls back open transactions
        and ends every session cleanly; ``immediate`` kills every process at once, as a crash or a
        power cut would, and the next start recovers from the WAL."""
        await self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "60", "stop")

    async def restart(self, mode: StopMode = "fast") -> None:
        """Stop (in ``mode``, if it runs) and start again on the same port and data directory."""
        if self.running:
            await self.stop(mode)
        await self.start()


@contextlib.asynccontextmanager
async def own_cluster(directory: Path | None = None, *, database: str = "tally") -> AsyncIterator[Cluster]:
    """A fresh PostgreSQL cluster (the binaries of the ``pgserver`` package) in ``directory`` (a
    pytest ``tmp_path``; a temporary directory when None), on a free port of 127.0.0.1, holding
    ``database`` migrated as tests/conftest.py migrates the template (the application role
    tests.helpers.APP_ROLE, and the test client). Always stopped on the way out."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(_temporary_directory()))
        directory.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix="pg-", dir=directory.resolve()))  # one per cluster
        socket_dir = directory
        if len(f"{socket_dir}/.s.PGSQL.65535") > _SOCKET_PATH_MAX:
            socket_dir = Path(stack.enter_context(_temporary_directory()))
        user = _system_user()
        if user is not None:
            _hand_over(directory, user)
            if socket_dir != directory:
                _hand_over(socket_dir, user)
        cluster = Cluster(directory, free_port(), socket_dir, database)
        await cluster._initdb()
        try:
            await cluster._first_start()
            admin = await asyncpg.connect(cluster.admin_url)
            try:
                await admin.execute(f'CREATE DATABASE "{database}"')
            finally:
                await admin.close()
            conn = await asyncpg.connect(cluster.url)
            try:
                await migrate(conn, app_role=APP_ROLE, app_password=None)
                await add_test_client(conn)
            finally:
                await conn.close()
            yield cluster
        finally:
            if cluster.running:
                await cluster.stop("immediate")


@contextlib.contextmanager
def _temporary_directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="tally-pg-") as name:
        yield name


# --------------------------------------------------------------------------------------------------
# A TCP proxy that can stall and reset the path


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s socket at once, with a RST (SO_LINGER 0), unflushed."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None

    def abort(self) -> None:
        _abort(self.client)
        _abort(self.upstream)


class TcpProxy:
    """A TCP proxy on a free port of 127.0.0.1, forwarding each connection to ``target_host:
    target_port`` both ways. ``stall()`` stops forwarding bytes in both directions without closing
    anything (a network path that silently stops answering); new connections are still accepted,
    and stalled too (not even connected onwards) until ``resume()``. ``reset()`` ends every current
    connection abruptly (RST to both sides)."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @classmethod
    def to_url(cls, url: str) -> TcpProxy:
        """A proxy to the server of ``url`` (a PostgreSQL URL with a TCP host)."""
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"{url!r} names no TCP host (a unix socket cannot be proxied)")
        return cls(parts.hostname, parts.port or 5432)

    def url_via(self, url: str) -> str:
        """``url`` going through this proxy."""
        return url_via(url, self.host, self.port)

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    @property
    def connections(self) -> int:
        """Connections open now (accepted and not yet closed)."""
        return len(self._links)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def reset(self) -> None:
        """Abort every current connection (both sockets, with a RST); returns once they are gone."""
        links = list(self._links)
        for link in links:
            link.abort()
            if link.task is not None:
                link.task.cancel()
        await asyncio.gather(*(link.task for link in links if link.task is not None), return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self.reset()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The work runs in a task of its own, which reset() may cancel: asyncio reports a connection
        # callback that ends cancelled as an error.
        link = _Link(writer)
        link.task = asyncio.create_task(self._forward(reader, writer, link))
        with contextlib.suppress(asyncio.CancelledError):
            await link.task

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        self._links.add(link)
        self.accepted += 1
        try:
            await self._flowing.wait()  # stalled: the connection goes nowhere until resumed
            upstream_reader, link.upstream = await asyncio.open_connection(self.target_host, self.target_port)
            await asyncio.gather(
                self._pump(reader, link.upstream, link), self._pump(upstream_reader, writer, link)
            )
        except OSError:
            pass  # the target refused or vanished: the client sees its connection reset
        finally:
            link.abort()
            self._links.discard(link)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(65536)
                if not data:  # a half close is passed on
                    if sink.can_write_eof() and not sink.transport.is_closing():
                        sink.write_eof()
                    return
                await self._flowing.wait()  # bytes read just before stall() are held too
                sink.write(data)
                await sink.drain()
        except OSError:
            link.abort()


# --------------------------------------------------------------------------------------------------
# Processes


async def sigkill(process: asyncio.subprocess.Process) -> int:
    """SIGKILL ``process`` (no handler runs, nothing is flushed) and reap it; its exit code."""
    process.send_signal(signal.SIGKILL)
    return await process.wait()


async def sessions_gone(url: str, application_name: str, within: float = 30.0) -> None:
    """Wait until the database has no session named ``application_name`` (a killed API process's
    pool is ``tally-api:<pid>``): every transaction it started has committed or rolled back. A bound
    on waiting, not a timing assertion."""
    conn = await asyncpg.connect(url)
    try:
        deadline = asyncio.get_running_loop().time() + within
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        while (left := await conn.fetchval(sql, application_name)) > 0:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{left} sessions of {application_name} still open after {within} s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True)
class Attempt:
    """One request of the load, as the caller saw it: an HTTP status and body, or the transport
    error that ended it (``error`` is the httpx exception's class name and message)."""

    key: str
    path: str
    body: dict[str, Any]
    worker: int
    started: float  # time.perf_counter() when sent
    latency: float  # seconds until the answer, or the error
    status: int | None = None
    response: bytes = b""
    replayed: bool = False
    error: str | None = None
    error_type: str | None = None
    retry_after: str | None = None  # the Retry-After header of a 503 or 429

    @property
    def acknowledged(self) -> bool:
        return self.status == 201

    @property
    def failed(self) -> bool:
        """No decision reached the caller: a transport error or a 5xx."""
        return self.status is None or self.status >= 500

    @property
    def unsent(self) -> bool:
        """Failed before a byte of it could reach the server (the connection was refused)."""
        return self.error_type in {"ConnectError", "ConnectTimeout", "PoolTimeout"}

    def json(self) -> Any:
        """The response body, decoded (None when there was none)."""
        return json.loads(self.response) if self.response else None


@dataclass(frozen=True)
class Latency:
    """Latency figures of a set of attempts, in seconds (all zero when there were none)."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, latencies: Sequence[float]) -> Latency:
        if not latencies:
            return cls(0, 0.0, 0.0, 0.0)
        ordered = sorted(latencies)

        def rank(q: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

        return cls(len(ordered), rank(0.5), rank(0.99), ordered[-1])

    def __str__(self) -> str:
        ms = {name: f"{getattr(self, name) * 1000:.1f}ms" for name in ("p50", "p99", "max")}
        return f"n={self.count} p50={ms['p50']} p99={ms['p99']} max={ms['max']}"


class LoadRecord:
    """Every attempt of a load (``run_load``), appended as each ends; ``in_flight`` counts the
    requests sent and not yet answered. ``wait_for`` lets a test act on the load's progress."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.in_flight = 0
        self._changed = asyncio.Event()

    def _started(self) -> None:
        self.in_flight += 1
        self._changed.set()

    def _ended(self, attempt: Attempt | None) -> None:
        self.in_flight -= 1
        if attempt is not None:  # None: the request was cancelled, not answered
            self.attempts.append(attempt)
        self._changed.set()

    def count(self, status: int | None) -> int:
        """Attempts answered with ``status`` (None: ended by a transport error)."""
        return sum(a.status == status for a in self.attempts)

    @property
    def acknowledged(self) -> list[Attempt]:
        return [a for a in self.attempts if a.acknowledged]

    @property
    def failed(self) -> list[Attempt]:
        return [a for a in self.attempts if a.failed]

    def statuses(self) -> Counter[str]:
        """How the attempts ended: HTTP statuses, and transport errors by class."""
        return Counter(str(a.status) if a.status is not None else str(a.error_type) for a in self.attempts)

    def latency(self, which: Callable[[Attempt], bool] = lambda a: True) -> Latency:
        return Latency.of([a.latency for a in self.attempts if which(a)])

    async def wait_for(self, predicate: Callable[[LoadRecord], bool], within: float = 60.0) -> None:
        """Wait until ``predicate(self)`` holds (checked whenever an attempt starts or ends). A bound
        on waiting, not a timing assertion."""
        try:
            async with asyncio.timeout(within):
                while not predicate(self):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"the load did not get there within {within} s: {dict(self.statuses())}"
            ) from None


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    return await http.post(path, json=body, headers={"Idempotency-Key": key})


async def open_wallets(
    base_url: str, users: Sequence[str], *, asset: str = "GOLD", balance: int = 10**9
) -> None:
    """Define ``asset`` and open a wallet holding ``balance`` of it for every user, over HTTP (with
    fixed keys: calling this again replays)."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30) as http:
        asset_body = {"code": asset, "name": asset.title(), "decimals": 0}
        response = await _post(http, "/v1/assets", asset_body, f"faults-asset-{asset}")
        assert response.status_code == 201, response.text
        for user in users:
            for path, body, key in (
                ("/v1/wallets", {"user_id": user}, f"faults-wallet-{user}"),
                (
                    f"/v1/wallets/{user}/top-ups",
                    {"asset": asset, "amount": balance},
                    f"faults-fund-{user}-{asset}",
                ),
            ):
                response = await _post(http, path, body, key)
                assert response.status_code == 201, response.text


async def _send(
    http: httpx.AsyncClient, record: LoadRecord | None, worker: int, path: str, body: dict[str, Any], key: str
) -> Attempt:
    """One request, timed; never raises for a transport error (it is recorded instead)."""
    if record is not None:
        record._started()
    started = time.perf_counter()
    attempt = None
    try:
        response = await _post(http, path, body, key)
    except httpx.TransportError as exc:
        attempt = Attempt(
            key, path, body, worker, started, time.perf_counter() - started,
            error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
        )  # fmt: skip
    else:
        attempt = Attempt(
            key, path, body, worker, started, time.perf_counter() - started,
            status=response.status_code, response=response.content,
            replayed=response.headers.get("idempotent-replayed") == "true",
            retry_after=response.headers.get("retry-after"),
        )  # fmt: skip
    finally:
        if record is not None:
            record._ended(attempt)
    return attempt


async def run_load(
    base_url: str,
    users: Sequence[str],
    *,
    workers: int = 16,
    until: asyncio.Event | float,
    asset: str = "GOLD",
    record: LoadRecord | None = None,
    spend_share: float = 0.5,
    max_amount: int = 100,
    request_timeout: float = 30.0,
    backoff: float = 0.05,
    seed: int = 0,
) -> LoadRecord:
    """Drive top-ups and spends of ``asset`` on ``users``' wallets (``open_wallets`` first) from
    ``workers`` concurrent callers, each with its own HTTP connection and a fresh Idempotency-Key per
    command, until ``until`` is set (an Event) or that many seconds have passed; attempts in flight
    then run to their end. Every attempt is recorded (into ``record`` when given, which a test can
    watch meanwhile). A worker whose request ended in a transport error waits ``backoff`` seconds
    before its next one (a dead server is not hammered)."""
    record = record if record is not None else LoadRecord()
    if isinstance(until, asyncio.Event):
        stop = until
    else:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(until, stop.set)

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=request_timeout) as http:
            while not stop.is_set():
                user = rng.choice(users)
                kind = "spends" if rng.random() < spend_share else "top-ups"
                body = {"asset": asset, "amount": rng.randint(1, max_amount)}
                attempt = await _send(
                    http, record, i, f"/v1/wallets/{user}/{kind}", body, f"load-{uuid.uuid4().hex}"
                )
                if attempt.status is None and not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return record


# --------------------------------------------------------------------------------------------------
# Checkers


# Refusals that are decisions on the ledger's state: recorded and replayed like a success.
_RECORDED_REFUSALS = {"insufficient_funds", "version_mismatch"}


async def check_acknowledged(owner_url: str, record: LoadRecord, *, client_id: str = TEST_CLIENT_ID) -> None:
    """(a) Every acknowledged (201) command is in the database exactly once: its key recorded in
    ``commands`` as accepted, pointing at the transaction id the caller was given, and exactly one
    event carrying the key in its metadata (that very event). No key of the load has more than one
    event, and a refusal the caller was told of (4xx) none; a refusal that is a decision
    (insufficient funds) is recorded as such."""
    keys = list({a.key for a in record.attempts})
    conn = await asyncpg.connect(owner_url)
    try:
        commands = {
            r["command_id"]: r
            for r in await conn.fetch(
                "SELECT command_id, outcome, event_id::text AS event_id FROM commands "
                "WHERE client_id = $1 AND command_id = ANY($2::text[])",
                uuid.UUID(client_id),
                keys,
            )
        }
        events: dict[str, list[str]] = {}
        for r in await conn.fetch(
            "SELECT metadata ->> 'command_id' AS key, event_id::text AS event_id FROM events "
            "WHERE metadata ->> 'client_id' = $1 AND metadata ->> 'command_id' = ANY($2::text[])",
            client_id, keys,
        ):  # fmt: skip
            events.setdefault(r["key"], []).append(r["event_id"])
    finally:
        await conn.close()
    problems = []
    for key, found in events.items():
        if len(found) > 1:
            problems.append(f"{key}: {len(found)} events {found}")
    for a in record.attempts:
        if a.acknowledged:
            transaction_id = a.json()["transaction_id"]
            command = commands.get(a.key)
            if command is None:
                problems.append(f"{a.key} ({a.path}): acknowledged, not in commands")
            elif command["outcome"] != "accepted" or command["event_id"] != transaction_id:
                problems.append(f"{a.key}: acknowledged as {transaction_id}, recorded as {dict(command)}")
            if events.get(a.key) != [transaction_id]:
                problems.append(f"{a.key}: acknowledged as {transaction_id}, events {events.get(a.key)}")
        elif a.status is not None and 400 <= a.status < 500:
            if a.key in events:
                problems.append(
                    f"{a.key}: answered {a.status} {a.response!r}, yet has events {events[a.key]}"
                )
            code = (a.json() or {}).get("code")
            recorded = commands.get(a.key)
            if code in _RECORDED_REFUSALS and (recorded is None or recorded["outcome"] != code):
                problems.append(f"{a.key}: refused as {code}, recorded as {recorded and dict(recorded)}")
    assert not problems, f"{len(problems)} commands are not applied as answered:\n" + "\n".join(problems[:50])


@dataclass
class ReplayReport:
    """What resending every key found: ``applied_unanswered``, keys that failed for their caller
    yet had been decided, mostly applied (their resend replayed them); ``applied_on_resend``, failed
    keys the resend decided for the first time; ``resends``, every resend."""

    resends: list[Attempt] = field(default_factory=list)
    applied_unanswered: list[str] = field(default_factory=list)
    applied_on_resend: list[str] = field(default_factory=list)


_RESENT_DECISIONS = {201, 409}  # a transaction's decisions: accepted, insufficient funds


def _same_answer(first: Attempt, again: Attempt) -> str | None:
    """What is wrong with ``again`` as a replay of ``first`` (same status and body, marked
    Idempotent-Replayed), if anything."""
    if (again.status, again.replayed) == (first.status, True) and again.json() == first.json():
        return None
    return (
        f"{first.key}: answered {first.status} {first.response!r}, then "
        f"{again.status or again.error} replayed={again.replayed} {again.response!r}"
    )


def _judge_resend(
    first: Attempt, resent: Attempt, before: dict[str, tuple[str | None, int]], report: ReplayReport
) -> str | None:
    """What is wrong with ``resent``, the resend of ``first``, if anything; a failed key's resend
    is filed in ``report``."""
    if first.acknowledged or (not first.failed and first.key in before):
        return _same_answer(first, resent)
    if not first.failed:  # a refusal the API does not record (404, 422, ...): refused again
        return None if resent.status == first.status else _same_answer(first, resent)
    if resent.status not in _RESENT_DECISIONS:
        return (
            f"{first.key}: failed ({first.error or first.status}), resent "
            f"{resent.status or resent.error} {resent.response!r}"
        )
    if resent.replayed:  # the failed attempt had been applied (or decided) all the same
        report.applied_unanswered.append(first.key)
    elif first.key in before:
        return f"{first.key}: recorded {before[first.key]} before the resend, which did not replay it"
    else:
        report.applied_on_resend.append(first.key)
    return None


async def check_replays(
    base_url: str, owner_url: str, record: LoadRecord, *, workers: int = 16, request_timeout: float = 30.0
) -> ReplayReport:
    """(b) Resend every key of the load, with its exact request, to ``base_url``. A key answered
    before replays that answer (same status and body, header Idempotent-Replayed: true; a refusal the
    API does not record, such as a 404, is refused again). A key that failed (5xx, a transport error)
    is decided now (201 or 409) and applied at most once: replayed when the database already held
    it, else applied by this resend (and replayed by a second one). A key that never reached the
    server (connection refused) must not have been in the database before.

    Call it once nothing the load started can still commit: a killed API process's sessions gone
    (``sessions_gone``), a stalled proxy resumed or reset."""
    firsts: dict[str, Attempt] = {}
    for a in record.attempts:
        firsts.setdefault(a.key, a)
    failed = [k for k, a in firsts.items() if a.failed]
    before = await _recorded(owner_url, list(firsts))
    report = ReplayReport()
    problems = [
        f"{key}: never sent ({firsts[key].error}), yet recorded as {before[key]}"
        for key in failed
        if firsts[key].unsent and key in before
    ]
    gate = asyncio.Semaphore(workers)
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=request_timeout) as http:

        async def resend(a: Attempt) -> Attempt:
            """As a well-behaved client resends: a 503 says when to try again (Retry-After)."""
            async with gate:
                for _ in range(20):
                    attempt = await _send(http, None, -1, a.path, a.body, a.key)
                    if attempt.status != 503:
                        break
                    await asyncio.sleep(float(attempt.retry_after or 1))
                return attempt

        report.resends = list(await asyncio.gather(*(resend(a) for a in firsts.values())))
        for resent in report.resends:
            problems.append(_judge_resend(firsts[resent.key], resent, before, report) or "")
        # A failed key the resend decided is decided for good: a second resend replays it.
        decided = [r for r in report.resends if firsts[r.key].failed and r.status in _RESENT_DECISIONS]
        for resent, again in zip(decided, await asyncio.gather(*(resend(r) for r in decided)), strict=True):
            problems.append(_same_answer(resent, again) or "")

    after = await _recorded(owner_url, failed)
    problems += [f"{k}: failed, then {after[k][1]} events after the resend" for k in after if after[k][1] > 1]
    problems = [p for p in problems if p]
    assert not problems, f"{len(problems)} keys do not replay:\n" + "\n".join(problems[:50])
    return report


async def _recorded(
    owner_url: str, keys: list[str], client_id: str = TEST_CLIENT_ID
) -> dict[str, tuple[str | None, int]]:
    """The keys the database holds: their recorded outcome and how many events carry them."""
    conn = await asyncpg.connect(owner_url)
    try:
        rows = await conn.fetch(
            """SELECT c.command_id, c.outcome,
                      (SELECT count(*) FROM events e WHERE e.metadata ->> 'client_id' = $3
                          AND e.metadata ->> 'command_id' = c.command_id) AS events
                 FROM commands c WHERE c.client_id = $1 AND c.command_id = ANY($2::text[])""",
            uuid.UUID(client_id), keys, client_id,
        )  # fmt: skip
    finally:
        await conn.close()
    return {r["command_id"]: (r["outcome"], r["events"]) for r in rows}


async def check_verify(owner_url: str, *, within: float = 120.0) -> str:
    """(c) ``tally verify`` (its own process, as the owner) exits 0; its output."""
    env = {k: v for k, v in os.environ.items() if k not in {"TALLY_APP_ROLE", "TALLY_OWNER_DATABASE_URL"}}
    env |= {"DATABASE_URL": owner_url, "TALLY_LOG_LEVEL": "warning"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "verify", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    output = out.decode(errors="replace")
    assert process.returncode == 0, f"tally verify exited {process.returncode}:\n{output}"
    return output


@dataclass
class LoadReport:
    """What a fault test prints: how the load ended, its latencies, and what the resend found."""

    statuses: dict[str, int]
    latency: Latency  # every attempt of the load
    acknowledged_latency: Latency
    replays: ReplayReport
    verify: str

    def __str__(self) -> str:
        return (
            f"load: {self.statuses}; latency (all) {self.latency}; (201) {self.acknowledged_latency}; "
            f"failed yet applied: {len(self.replays.applied_unanswered)}, applied on resend: "
            f"{len(self.replays.applied_on_resend)}; {self.verify.strip().splitlines()[0]}"
        )


async def check_load(
    record: LoadRecord, *, base_url: str, owner_url: str, hang_bound: float = 60.0
) -> LoadReport:
    """(a), (b) and (c) in turn, and (d) the latency figures, bounded only generously (``hang_bound``
    seconds: a hang, not a slowdown, fails it)."""
    await check_acknowledged(owner_url, record)
    replays = await check_replays(base_url, owner_url, record)
    await check_acknowledged(owner_url, record)  # and the resends added nothing twice
    verified = await check_verify(owner_url)
    latency = record.latency()
    report = LoadReport(
        dict(record.statuses()), latency, record.latency(lambda a: a.acknowledged), replays, verified
    )
    assert latency.max < hang_bound, report
    assert Latency.of([a.latency for a in replays.resends]).max < hang_bound, report
    return report


def pg_program(name: str) -> str:
    """The path of one of the bundled PostgreSQL programs (pg_dump, pg_restore, ...)."""
    return str(_pg_bin() / name)
