"""``tally batch FILE``: send a file of commands (JSON lines, each one command of POST /v1/batches:
``{"kind", "user_id", "asset", "amount", "key", "reference"?, "metadata"?}``) to a running Tally, in
batches (of ``--size`` commands, fewer when their lines are long), with a progress bar: a
100,000-user bonus campaign from the command line.

It is an API client like any other: it sends as the key in ``TALLY_API_KEY`` (or, in development,
the key ``make run`` printed, kept in ``TALLY_DATA_DIR/development-key``), and each command needs
that key's scope for its kind. Running the same file again is safe: each command's ``key`` applies
it once, and each batch's Idempotency-Key (the file's SHA-256, the batch size, atomic or not, and
the batch's number) replays a batch that was answered. A batch answered 503 or 429 is sent again,
after its Retry-After, up to ``RETRIES`` times.

Exit status: 0 when every command was applied (or replayed an application), 1 when some were
refused (each named on stderr with its line), 2 when the file is not valid (nothing is sent) or
the server refused a whole batch."""

from __future__ import annotations

import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import httpx
from tqdm import tqdm

from api.batches import BatchCommand
from api.errors import InvalidRequest, decode_strict
from api.settings import BATCH_BYTES_PER_COMMAND, Settings

RETRIES: Final = 8
SHOWN_REFUSALS: Final = 20


class BatchFileError(Exception):
    """The file cannot be sent: names the line and what is wrong with it."""


@dataclass
class Tally:
    applied: int = 0
    replayed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    refusals: list[str] = field(default_factory=list)


def read_commands(path: Path) -> tuple[list[bytes], list[int], bytes]:
    """The file's commands (each line, checked as POST /v1/batches would check it), their line
    numbers, and the file's digest. Blank lines are skipped; any invalid line refuses the file."""
    raw = path.read_bytes()
    lines, numbers = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            decode_strict(line, BatchCommand)
        except InvalidRequest as exc:
            raise BatchFileError(f"{path}:{number}: {exc}") from None
        lines.append(line)
        numbers.append(number)
    if not lines:
        raise BatchFileError(f"{path}: no commands")
    return lines, numbers, hashlib.sha256(raw).digest()


def send_file(path: Path, url: str, secret: str, *, size: int, atomic: bool, out: TextIO = sys.stderr) -> int:
    lines, numbers, digest = read_commands(path)
    tally = Tally()
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    with (
        httpx.Client(base_url=url, headers=headers, timeout=120) as http,
        tqdm(total=len(lines), unit="cmd", file=out, unit_scale=True, disable=None) as bar,
    ):
        for number, (start, end) in enumerate(_chunks(lines, size)):
            chunk = lines[start:end]
            body = b'{"atomic":%s,"commands":[%s]}' % (b"true" if atomic else b"false", b",".join(chunk))
            key = f"tally-batch:{digest.hex()[:32]}:{size}:{'atomic' if atomic else 'each'}:{number}"
            answer, replayed = _post(http, body, key)
            results = answer.get("results")
            if not isinstance(results, list):
                first, last = numbers[start], numbers[start + len(chunk) - 1]
                raise BatchFileError(
                    f"the server refused the batch of lines {first}-{last}: "
                    f"{answer.get('status')} {answer.get('code')}: {answer.get('detail')}"
                )
            _count(tally, results, numbers[start:], replayed)
            bar.update(len(chunk))
    elapsed = time.monotonic() - started
    total = len(lines)
    refused = sum(tally.refused.values())
    codes = ", ".join(f"{code} {n:,}" for code, n in tally.refused.most_common())
    batches = len(_chunks(lines, size))
    print(
        f"batch: {_count_of(total, 'command')} in {_count_of(batches, 'batch')}, {elapsed:.1f} s "
        f"({total / elapsed:,.0f}/s): {tally.applied:,} applied, {tally.replayed:,} replayed, "
        f"{refused:,} refused" + (f" ({codes})" if refused else ""),
        file=out,
    )
    for line in tally.refusals:
        print(line, file=out)
    if refused > len(tally.refusals):
        print(f"  ... and {refused - len(tally.refusals):,} more", file=out)
    return 1 if refused else 0


def _count_of(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith("h") else "s")


def _chunks(lines: list[bytes], size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch: at most ``size`` commands, and at most the bytes a server whose
    TALLY_MAX_BATCH is ``size`` takes in one body (4 KiB per command, plus 64 KiB), so that commands
    with large metadata go in smaller batches. The same file and size always give the same batches."""
    budget = size * BATCH_BYTES_PER_COMMAND + Settings().max_body_bytes - 64
    chunks, start, used = [], 0, 0
    for i, line in enumerate(lines):
        if i > start and (i - start == size or used + len(line) + 1 > budget):
            chunks.append((start, i))
            start, used = i, 0
        used += len(line) + 1
    chunks.append((start, len(lines)))
    return chunks


def _post(http: httpx.Client, body: bytes, key: str) -> tuple[dict[str, Any], bool]:
    """One batch, sent again while the server says to come back later (503, 429) or cannot be
    reached (its Idempotency-Key makes that safe): the answer, and whether it was replayed."""
    for attempt in range(RETRIES + 1):
        try:
            response = http.post("/v1/batches", content=body, headers={"Idempotency-Key": key})
        except httpx.TransportError as exc:
            if attempt == RETRIES:
                raise BatchFileError(f"the server could not be reached: {exc}") from None
            time.sleep(min(2**attempt, 10))
            continue
        if response.status_code in {429, 503} and attempt < RETRIES:
            time.sleep(_retry_after(response, attempt))
            continue
        try:
            answer: dict[str, Any] = response.json()
        except ValueError:
            raise BatchFileError(
                f"the server answered {response.status_code}: {response.text[:200]}"
            ) from None
        return answer, response.headers.get("idempotent-replayed") == "true"
    raise AssertionError("unreachable")


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        return min(float(response.headers.get("retry-after", "")), 30.0)
    except ValueError:
        return float(min(2**attempt, 10))


def _count(tally: Tally, results: list[dict[str, Any]], numbers: list[int], replayed: bool) -> None:
    for result in results:
        if result["status"] == 201:
            if replayed or result.get("replayed"):
                tally.replayed += 1
            else:
                tally.applied += 1
            continue
        problem = result.get("problem") or {}
        code = str(problem.get("code", result["status"]))
        tally.refused[code] += 1
        if len(tally.refusals) < SHOWN_REFUSALS:
            detail = problem.get("detail", "")
            tally.refusals.append(
                f"  line {numbers[result['index']]} (key {result['key']}): {code}: {detail}"
            )


def development_secret(data_dir: Path) -> str | None:
    kept = data_dir / "development-key"
    return kept.read_text().strip() if kept.exists() else None
