"""The server under test: ``tally serve --projector`` as a subprocess on a free loopback port.

It is started exactly as ``make run`` starts it (one uvicorn process with uvloop and httptools,
the projector in the same process), pointed at the benchmark database, with access logs off and
the log level at warning so logging does not eat into the measured CPU. Its output goes to a log
file beside the results. It is always stopped: SIGTERM (uvicorn's graceful shutdown, at most 10 s),
then SIGKILL if it has not exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.httpclient import HttpConnection, ProtocolError, build_request

HOST = "127.0.0.1"
STOP_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _command(projector: bool) -> list[str]:
    # The interpreter with the module (not the venv's `tally` script): a worktree's checkout is
    # what runs when the benchmark runs from it (its directory is first on the module path).
    return [sys.executable, "-m", "api.cli", "serve", *(["--projector"] if projector else [])]


@contextlib.contextmanager
def running_server(
    database_url: str, *, root: Path, log_path: Path, projector: bool = True
) -> Iterator[Server]:
    """Start the server (with the projector unless told otherwise); stop it on exit, whatever
    happened meanwhile (KeyboardInterrupt too)."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "HOST": HOST,
        "PORT": str(port),
        "TALLY_LOG_LEVEL": "warning",
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        # Its own session: a Ctrl-C reaches only the benchmark, which then stops the server itself.
        process = subprocess.Popen(  # noqa: S603 (our own interpreter's entry point)
            _command(projector),
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, port, log_path)
    try:
        yield server
    finally:
        stop(server)


def stop(server: Server) -> int | None:
    """SIGTERM, wait, SIGKILL if needed; the exit code."""
    process = server.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    return process.returncode


async def wait_live(server: Server, *, max_wait: float = 60.0) -> float:
    """Poll ``GET /health/live`` until it answers 200; seconds waited. RuntimeError on exit/timeout."""
    request = build_request("GET", "/health/live", host=f"{HOST}:{server.port}", headers={}, body=b"")
    started = time.perf_counter()
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {server.process.returncode}:\n{server.log_tail()}"
            )
        connection = HttpConnection(HOST, server.port)
        try:
            status, _ = await asyncio.wait_for(connection.request(request), timeout=2.0)
            if status == 200:
                return round(time.perf_counter() - started, 2)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, ProtocolError):
            pass
        finally:
            connection.close()
        if time.perf_counter() - started > max_wait:
            raise RuntimeError(
                f"the server did not answer /health/live in {max_wait:.0f} s:\n{server.log_tail()}"
            )
        await asyncio.sleep(0.1)
