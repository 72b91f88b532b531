"""Fuzzing: schemathesis reads the app's own OpenAPI document and sends generated requests, valid and
invalid, to every operation, with a valid key. Every response must be no server error and must
match the document: a documented status code, a documented content type, a body of its schema.

Each operation is its own test, on its own database, seeded first (two assets, two wallets with
history) so that generated requests also reach real rows: the seeded ids, tokens, cursors,
versions and idempotency keys, and edge values of the formats the document leaves as plain
strings, are mixed into what the fuzzer draws for those parameters (and each edge value is also
sent once for sure, by the last test). The app runs in-process behind schemathesis's ASGI
transport, its lifespan (pool, projector) started on the first request and stopped when the test
ends (by schemathesis's pytest plugin, before the test's fixtures are torn down). Generation is
derandomized and bounded per operation, with no deadline, so a CI run is reproducible and short.

The document is the one the app serves at /docs/openapi.json, loaded once at import; the app under
test comes from a fixture and is passed to each call. (schemathesis.pytest.from_fixture, which
would load the document from a fixture, fails on pytest 9.2: it uses Node._nodeid, which pytest
no longer has. For the same reason pytest reports every operation's test under one node id; the
operation is in the test's name, which a failure's heading shows and -k selects by.)

GET /v1/events/stream is left out: its answer never ends, and a fuzzer reads answers whole (its
refusals: tests/api/test_feed.py; the stream itself: tests/integration/test_feed.py). The event
feed's long polls wait at most 0.1 s here (what a fuzzed `wait` within the documented range
becomes), so that a case costs what any query does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient
from schemathesis import HookContext

from api.app import create_app
from api.settings import Settings
from projections.queries import encode_cursor
from tests.api.support import created, define_asset, open_wallet, post
from tests.helpers import AUTH, api_client, projected

# Generated cases per operation in the fuzzing phase. The coverage phase adds its own: a fixed set
# of boundary and invalid values per operation, derived from the document alone.
MAX_EXAMPLES = 100
# How long a query with a consistency token waits for the projections. The fuzzer sends tokens
# from the future, which are answered with the documented 503 after this long: short, so cheap.
CONSISTENCY_TIMEOUT = 0.1
# What every response is checked for: no server error (below), and a documented status code, a
# documented content type, a body and headers of the documented schemas.
CHECKS = (
    "no_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)


@schemathesis.check
def no_server_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """No 5xx, but the documented 503 of a query whose consistency token its projections have not
    reached within the timeout (the fuzzer sends tokens from the future): schemathesis's own
    not_a_server_error takes every 5xx for a failure."""
    if response.status_code == 503 and _problem_code(response) == "projection_timeout":
        return
    if response.status_code >= 500:
        raise AssertionError(f"server error {response.status_code}")


def _problem_code(response: schemathesis.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def _served_document() -> dict[str, Any]:
    """The OpenAPI document as the app serves it at /docs/openapi.json. Serving it needs no database:
    the test client is not entered, so the app's lifespan does not run."""
    app = create_app(Settings(database_url="postgresql://document-only.invalid/tally"))
    response = TestClient(app).get("/docs/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


STREAM = "/v1/events/stream"
DOCUMENT = _served_document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "headers": AUTH,
            # A request that hangs fails its test rather than the whole run.
            "request-timeout": 10.0,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
).exclude(path=STREAM)

# --- steering generation toward real rows, edge values and accepted commands ------------------
# Drawn from the document alone, requests would rarely name an existing wallet or transaction, never
# send an edge value of a format the document leaves as a plain string (an as_of time or position,
# a consistency token, a cursor, an If-Match version), and most commands would be refused before
# reaching the ledger: the document does not say that an Idempotency-Key is required, nor that a
# body may hold only its declared fields. So these hooks bias what schemathesis generates: a
# parameter is swapped for a known value two times in three (a real one of the seeded ledger, or
# an edge one); a POST's Idempotency-Key is a fresh one, except one time in three each the one
# generated or one the seeding used already; a body loses the fields it does not declare three
# times in four. Everything else stays as generated, invalid values included.

# "<location>.<name>" of a request parameter or body field -> real values of the seeded ledger.
# Filled by the `seeded` fixture for the test that runs; the hooks read it while drawing.
SEEDED: dict[str, list[str]] = {}
MAX_BIGINT = str(2**63 - 1)
# "<location>.<name>" -> edge values of the parameter's format: the first and last instants there
# are (with the farthest UTC offsets), the first and last global positions and one past them,
# tokens, cursors and versions at and past the bigint range.
EDGES: dict[str, list[str]] = {
    "query.as_of": [
        "0001-01-01T00:00:00+14:00",
        "0001-01-01",
        "9999-12-31T23:59:59.999999-14:00",
        "0",
        MAX_BIGINT,
        f"{MAX_BIGINT}0",
    ],
    "query.consistent_with": ["0.0", f"{MAX_BIGINT}.{MAX_BIGINT}", "1.-1"],
    "query.cursor": ["v0", f"v{MAX_BIGINT}", f"v{MAX_BIGINT}0", "v-1"],
    "query.after": ["0.0", f"{2**64 - 1}.{MAX_BIGINT}", f"{2**64}.1", f"1.{MAX_BIGINT}0", "1.-1"],
    "header.If-Match": ['"0"', f'"{MAX_BIGINT}"', f'"{MAX_BIGINT}0"', 'W/"1"'],
    "path.transaction_id": ["00000000-0000-0000-0000-000000000000"],
}
IDEMPOTENCY_KEY = "Idempotency-Key"
# Every field a request body declares.
BODY_FIELDS = {
    field
    for name, definition in DOCUMENT["components"]["schemas"].items()
    if name.endswith("Request")
    for field in definition.get("properties", {})
}


def _weighted(generated: Any, other: st.SearchStrategy[Any], *, other_weight: int) -> st.SearchStrategy[Any]:
    """``generated`` once in ``1 + other_weight`` draws, else a value of ``other``."""
    return st.integers(0, other_weight).flatmap(lambda draw: st.just(generated) if draw == 0 else other)


def _known(location: str, values: Any) -> st.SearchStrategy[Any]:
    """``values``, each parameter with known values swapped for one of them two times in three."""
    if not isinstance(values, dict):
        return st.just(values)
    choices = {}
    for name, value in values.items():
        known = SEEDED.get(f"{location}.{name}", []) + EDGES.get(f"{location}.{name}", [])
        choices[name] = _weighted(value, st.sampled_from(known), other_weight=2) if known else st.just(value)
    return st.fixed_dictionaries(choices)


@schema.hook
def flatmap_path_parameters(context: HookContext, path_parameters: Any) -> st.SearchStrategy[Any]:
    return _known("path", path_parameters)


def _short_wait(query: Any) -> Any:
    wait = query.get("wait") if isinstance(query, dict) else None
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0.1 < wait <= 30:
        return {**query, "wait": 0.1}
    return query


@schema.hook
def flatmap_query(context: HookContext, query: Any) -> st.SearchStrategy[Any]:
    known = _known("query", query)
    return (
        known.map(_short_wait)
        if context.operation is not None and context.operation.path == "/v1/events"
        else known
    )


@schema.hook
def flatmap_headers(context: HookContext, headers: Any) -> st.SearchStrategy[Any]:
    is_post = context.operation is not None and context.operation.method.upper() == "POST"
    if not is_post or not isinstance(headers, dict):
        return _known("header", headers)
    # A fresh key, unless the one generated (one time in three) or one used already (one in three).
    fresh = st.uuids().map(lambda key: key.hex)
    generated = headers.get(IDEMPOTENCY_KEY)
    used = st.sampled_from(SEEDED.get(f"header.{IDEMPOTENCY_KEY}") or ["unused"])
    key = fresh if generated is None else st.one_of(st.just(generated), fresh, used)
    others = {name: value for name, value in headers.items() if name != IDEMPOTENCY_KEY}
    return st.tuples(_known("header", others), key).map(lambda drawn: {**drawn[0], IDEMPOTENCY_KEY: drawn[1]})


@schema.hook
def flatmap_body(context: HookContext, body: Any) -> st.SearchStrategy[Any]:
    if isinstance(body, dict):
        declared = {name: value for name, value in body.items() if name in BODY_FIELDS}
        trimmed = _weighted(body, st.just(declared), other_weight=3)
        return trimmed.flatmap(lambda values: _known("body", values))
    return _known("body", body)


# The seeded moves: (user, flow, body, Idempotency-Key).
SEED_MOVES = (
    ("alice", "top-ups", {"asset": "GOLD", "amount": 1_000}, "seed-top-up"),
    ("alice", "bonuses", {"asset": "GOLD", "amount": 50, "reference": "welcome"}, "seed-bonus"),
    ("alice", "spends", {"asset": "GOLD", "amount": 120, "metadata": {"order": "o-1"}}, "seed-spend"),
    ("bob", "top-ups", {"asset": "GEMS", "amount": 10}, "seed-bob"),
)


@pytest.fixture
async def seeded(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Two assets and two wallets with history, made through the API (an app instance of its own,
    stopped before the fuzzed one starts) and projected; their real values go into SEEDED."""
    async with api_client(create_app(settings, run_projector=True)) as client:
        await define_asset(client, "GOLD", decimals=0)
        await define_asset(client, "GEMS", decimals=2)
        opened = await open_wallet(client, "alice", {"tier": "gold"})
        await open_wallet(client, "bob")
        moves = [
            created(await post(client, f"/v1/wallets/{user}/{flow}", body, key=key))
            for user, flow, body, key in SEED_MOVES
        ]
        hold = created(await post(client, "/v1/wallets/alice/holds", {"asset": "GOLD", "amount": 1}))
    # Every seeded row in the read models before the first fuzzed request, so queries find them.
    await projected(pool)
    alice = [move for move in moves if move["user_id"] == "alice"]
    users, assets = ["alice", "bob"], ["GOLD", "GEMS"]
    SEEDED.update(
        {
            "path.user_id": users,
            "body.user_id": users,
            "path.transaction_id": [move["transaction_id"] for move in moves],
            "path.hold_id": [hold["hold_id"]],
            "query.consistent_with": [opened["consistency_token"], moves[-1]["consistency_token"]],
            # The next page's cursor after alice's newest transaction.
            "query.cursor": [encode_cursor(alice[-1]["wallet_version"])],
            # Feed cursors: a wallet's opening and the newest move; event types, one and several.
            "query.after": [opened["consistency_token"], moves[-1]["consistency_token"]],
            "query.types": ["CreditsSpent", "HoldPlaced,WalletOpened"],
            # A time and a global position (a token's second part) within alice's history.
            "query.as_of": [alice[1]["created_at"], alice[1]["consistency_token"].partition(".")[2]],
            "query.asset": assets,
            "body.asset": assets,
            "body.code": assets,
            # alice's current version, a stale one, and "any".
            "header.If-Match": [f'"{alice[-1]["wallet_version"]}"', '"1"', "*"],
            f"header.{IDEMPOTENCY_KEY}": [key for *_, key in SEED_MOVES],
        }
    )
    yield
    SEEDED.clear()


@pytest.fixture
def fuzz_app(settings: Settings, seeded: None) -> Litestar:
    """The app under test, on the seeded database, with its projector. Schemathesis starts its
    lifespan on the first request and stops it when the test ends, before the database goes."""
    # Webhooks on, pointing only at loopback: a fuzzed URL is refused without a DNS lookup.
    fast = msgspec.structs.replace(
        settings,
        consistency_timeout=CONSISTENCY_TIMEOUT,
        webhook_key="fuzz",
        webhook_allowed_hosts="127.0.0.1",
    )
    return create_app(fast, run_projector=True)


@schema.parametrize()
# The app is the same for every generated case of an operation (its state carries over between
# cases, as a server's would), which is what this health check warns of.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_operation_answers_as_documented(case: schemathesis.Case, fuzz_app: Litestar) -> None:
    case.call_and_validate(app=fuzz_app)


def _valid_case(
    path: str, method: str, index: int, location: str, name: str, value: str
) -> schemathesis.Case:
    """A request to the operation that is valid but for ``value`` as its parameter ``name``: for
    alice, or a seeded transaction, and for a command, a top-up, bonus or spend of 1 GOLD (the
    only commands with a parameter that has edge values)."""
    real = {
        "user_id": "alice",
        "transaction_id": SEEDED["path.transaction_id"][0],
        "hold_id": SEEDED["path.hold_id"][0],
        "webhook_id": "00000000-0000-0000-0000-000000000001",  # none: its routes answer 404
    }  # fmt: skip
    values: dict[str, dict[str, Any]] = {
        "path": {key: real[key] for key in real if f"{{{key}}}" in path},
        "query": {},
        "header": {**AUTH, **({IDEMPOTENCY_KEY: f"edge-{index}"} if method == "post" else {})},
    }
    values[location][name] = value
    operation = schema[path][method.upper()]
    kwargs = {"path_parameters": values["path"], "query": values["query"], "headers": values["header"]}
    if method == "post":
        return operation.Case(**kwargs, body={"asset": "GOLD", "amount": 1})
    return operation.Case(**kwargs)


def test_edge_values_answer_as_documented(fuzz_app: Litestar) -> None:
    """Every edge value, once each, in an otherwise valid request to every operation that takes the
    parameter: the fuzzer above draws each of them only by chance."""
    failures = []
    cases = [
        (path, method, parameter["in"], parameter["name"], value)
        for path, operations in DOCUMENT["paths"].items()
        if path != STREAM
        for method, operation in operations.items()
        for parameter in operation.get("parameters", [])
        for value in EDGES.get(f"{parameter['in']}.{parameter['name']}", [])
    ]
    assert {f"{location}.{name}" for *_, location, name, _ in cases} == set(EDGES)
    for index, (path, method, location, name, value) in enumerate(cases):
        try:
            _valid_case(path, method, index, location, name, value).call_and_validate(app=fuzz_app)
        except schemathesis.errors.FailureGroup as failure:
            failures.append(f"{method.upper()} {path} with {location} {name}={value!r}: {failure}")
    assert not failures, "\n".join(failures)
