"""HTTP controllers: validate, call one command handler or one query, return a Struct."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, PathParameter, QueryParameter

from api.auth import Principal, scoped
from api.database import BoundedPool
from api.dto import (
    CaptureRequest,
    DefineAssetRequest,
    MoveCreditsRequest,
    OpenWalletRequest,
    PlaceHoldRequest,
    Problem,
    ReverseRequest,
    StrictBody,
    VoidRequest,
)
from api.errors import IdempotencyKeyMissing, InvalidRequest
from api.observability import COMMANDS, REQUEST_ID
from api.ratelimit import ReadLimiter
from api.settings import Settings
from commands import CommandContext, EventStore, handle
from domain import (
    FLOWS_BY_KIND,
    CaptureHold,
    Command,
    DefineAsset,
    DomainError,
    GrantBonus,
    HoldNotFound,
    InsufficientFunds,
    OpenWallet,
    PlaceHold,
    ReverseTransaction,
    SpendCredits,
    TopUpCredits,
    TransactionCommand,
    TransactionNotFound,
    VoidHold,
    kind_of,
)
from domain.values import ASSET_CODE_PATTERN, USER_ID_PATTERN
from projections import queries
from projections.as_of import Moment, WalletAsOf, wallet_as_of
from projections.positions import Position
from projections.read_models import (
    Asset,
    AssetList,
    Hold,
    HoldPage,
    SystemBalances,
    Transaction,
    TransactionPage,
    Wallet,
)
from projections.watcher import ProjectionTimeout, ProjectionWatcher

T = TypeVar("T")
log = logging.getLogger("tally.commands")

# Matched with fullmatch: a `$` would also accept a trailing newline. If-Match compares strong
# validators only (RFC 9110 §13.1.1), so a weak W/"..." is refused.
_IDEMPOTENCY_KEY: Final = re.compile(r"[\x20-\x7e]{1,255}")
_ETAG: Final = re.compile(r'"?(\d{1,18})"?')

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="Required. 1-255 printable ASCII characters, unique per intended effect. "
        "A retry with the same key replays the first outcome.",
    ),
]
IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match", description='Optional: the wallet version the caller decided on, as "<version>".'
    ),
]
ConsistentWith = Annotated[
    str | None,
    QueryParameter(
        name="consistent_with",
        description="A consistency_token from a command response: wait until this read reflects it.",
    ),
]
Store = NamedDependency[EventStore]
Pool = NamedDependency[BoundedPool]
UserIdPath = Annotated[str, PathParameter(pattern=USER_ID_PATTERN, description="The wallet owner's user id.")]
HoldIdPath = Annotated[str, PathParameter(description="The hold's id (hold_id).")]
TransactionIdPath = Annotated[str, PathParameter(description="The transaction's id (transaction_id).")]


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """Problem responses of a route that needs a key: these, and 401, 403 and 429."""
    return {
        s: ResponseSpec(
            Problem, description="application/problem+json", media_type="application/problem+json"
        )
        for s in sorted({*statuses, 401, 403, 429})
    }


def _command_context(
    request: Request[Any, Any, Any],
    key: str | None,
    body: msgspec.Struct,
    expected_version: int | None = None,
) -> CommandContext:
    """The idempotency record's identity: the calling client (whose namespace the key is in), the
    key, and a fingerprint of method, path, the canonical body (the decoded body encoded again:
    field order and defaults fixed, the keys of every object sorted) and the expected version (a
    retry must be the same request to replay, however its JSON is laid out; `"3"` and `3` in
    If-Match are the same precondition). The SQL binds the fingerprint to the client before storing
    it (tally_fingerprint)."""
    principal: Principal = request.user
    key = idempotency_key_of(key)
    fingerprint, legacy = request_fingerprint(request.method, request.url.path, body, expected_version)
    return CommandContext(
        command_id=key,
        client_id=principal.client_id,
        created_by=principal.name,
        fingerprint=fingerprint,
        metadata=request_metadata(request),
        legacy_fingerprint=legacy,
        assets=None if principal.assets is None else tuple(sorted(principal.assets)),
    )


def idempotency_key_of(key: str | None) -> str:
    """The request's Idempotency-Key header, which every POST needs, checked."""
    if key is None:
        raise IdempotencyKeyMissing("every POST needs an Idempotency-Key header")
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    return key


def request_fingerprint(
    method: str, path: str, body: msgspec.Struct, expected_version: int | None = None
) -> tuple[bytes, bytes | None]:
    """The fingerprint of a request (see _command_context), and the one Tally computed before it
    sorted the keys of JSON objects when that differs."""
    precondition = "" if expected_version is None else str(expected_version)
    canonical = msgspec.json.encode(body, order="deterministic")
    fingerprint = CommandContext.fingerprint_of(method, path, canonical, precondition)
    as_sent = msgspec.json.encode(body)
    if as_sent == canonical:
        return fingerprint, None
    return fingerprint, CommandContext.fingerprint_of(method, path, as_sent, precondition)


def request_metadata(request: Request[Any, Any, Any]) -> dict[str, str]:
    """What a command records of the request that sent it: path, request id, user agent."""
    metadata = {"path": request.url.path}
    if request_id := REQUEST_ID.get():
        metadata["request_id"] = request_id
    if user_agent := request.headers.get("user-agent"):
        metadata["user_agent"] = user_agent[:128]
    return metadata


def _expected_version(if_match: str | None) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    match = _ETAG.fullmatch(if_match.strip())
    if match is None:
        raise InvalidRequest('If-Match must be a wallet version as "<version>"')
    return int(match.group(1))


def _record(kind: str, ctx: CommandContext, outcome: str, **fields: str | None) -> None:
    COMMANDS.labels(kind, outcome).inc()
    log.info(
        "command %s %s",
        kind,
        outcome,
        extra={
            "kind": kind,
            "client": ctx.created_by,
            "idempotency_key": ctx.command_id,
            "outcome": outcome,
            **fields,
        },
    )


async def _command(
    kind: str,
    store: EventStore,
    command: Command,
    ctx: CommandContext,
    type_: type[T],
    status_code: int = 201,
) -> Response[T]:
    """Run the command's handler; count its outcome and log it with its key and transaction id."""
    try:
        accepted = await handle(store, command, ctx)
    except DomainError as exc:
        if exc.replayed:
            _record(kind, ctx, "replayed", code=exc.code)
        else:
            _record(
                kind,
                ctx,
                "insufficient_funds" if isinstance(exc, InsufficientFunds) else "rejected",
                code=exc.code,
            )
        raise
    result = msgspec.json.decode(accepted.body, type=type_)
    _record(
        kind,
        ctx,
        "replayed" if accepted.replayed else "accepted",
        transaction_id=getattr(result, "transaction_id", None),
        hold_id=getattr(result, "hold_id", None),
        user_id=getattr(result, "user_id", None),
    )
    headers = {"Idempotent-Replayed": "true"} if accepted.replayed else {}
    return Response(result, status_code=status_code, headers=headers)


async def _wait(state: State, projections: tuple[str, ...], consistent_with: str | None) -> None:
    """Wait until every projection the query reads has applied ``consistent_with``."""
    if consistent_with is None:
        return
    try:
        token = Position.parse(consistent_with)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    watcher: ProjectionWatcher = state.watcher
    settings: Settings = state.settings
    limiter: ReadLimiter = state.read_limiter
    deadline = asyncio.get_running_loop().time() + settings.consistency_timeout
    async with limiter.set_aside():
        for projection in projections:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await watcher.wait_for(projection, token, remaining)


class AssetController(Controller):
    path = "/v1/assets"
    tags = ["assets"]

    @post(
        status_code=201,
        summary="Define an asset",
        responses=problem_responses(400, 409, 422),
        dto=StrictBody[DefineAssetRequest],
        return_dto=None,
        **scoped("assets:write"),
    )
    async def define_asset(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[DefineAssetRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Asset]:
        request.user.require_asset(data.code)
        ctx = _command_context(request, idempotency_key, data)
        command = DefineAsset(code=data.code, name=data.name, decimals=data.decimals)
        return await _command("define_asset", store, command, ctx, Asset)

    @get(summary="List assets", responses=problem_responses(400, 503), **scoped("ledger:read"))
    async def list_assets(
        self, state: State, pool: Pool, consistent_with: ConsistentWith = None
    ) -> AssetList:
        await _wait(state, ("wallets",), consistent_with)
        return await queries.list_assets(pool)


# Each flow's route, POST /v1/wallets/{user_id}/<segment>, and the scope it needs (a batch's
# commands of that kind need it too, api/batches.py).
FLOW_ROUTES: Final = {
    "top_up": ("top-ups", "credits:top-up"),
    "bonus": ("bonuses", "credits:bonus"),
    "spend": ("spends", "credits:spend"),
}


def flow_path(kind: str, user_id: str) -> str:
    """The path a transaction command of ``kind`` is sent to alone (its fingerprint names it)."""
    return f"/v1/wallets/{user_id}/{FLOW_ROUTES[kind][0]}"


def _transaction_route(command_type: type[TransactionCommand], summary: str) -> HTTPRouteHandler:
    """POST /v1/wallets/{user_id}/<segment>: one implementation for every flow, each with its own
    OpenAPI operation (named after its command, as Litestar named the hand-written ones)."""
    flow = FLOWS_BY_KIND[kind_of(command_type)]
    segment, scope = FLOW_ROUTES[flow.kind]
    # Only a flow that takes credits from the user can be refused for want of them.
    statuses = (400, 404, 409, 412, 422) if flow.user_sign < 0 else (400, 404, 412, 422)

    async def post_transaction(
        self: Controller,
        request: Request[Any, Any, Any],
        user_id: UserIdPath,
        data: JSONBody[MoveCreditsRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> Response[Transaction]:
        request.user.require_asset(data.asset)
        version = _expected_version(if_match)
        ctx = _command_context(request, idempotency_key, data, version)
        command = command_type(user_id=user_id, expected_version=version, **msgspec.structs.asdict(data))
        return await _command(flow.kind, store, command, ctx, Transaction)

    segment_id = "".join(part.title() for part in segment.split("-"))
    return post(
        f"/{{user_id:str}}/{segment}",
        status_code=201,
        summary=summary,
        responses=problem_responses(*statuses),
        operation_id=f"V1WalletsUserId{segment_id}{command_type.__name__}",
        dto=StrictBody[MoveCreditsRequest],
        return_dto=None,
        **scoped(scope),
    )(post_transaction)


class WalletController(Controller):
    path = "/v1/wallets"
    tags = ["wallets"]

    @post(
        status_code=201,
        summary="Open a wallet",
        responses=problem_responses(400, 409, 422),
        dto=StrictBody[OpenWalletRequest],
        return_dto=None,
        **scoped("wallets:write"),
    )
    async def open_wallet(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[OpenWalletRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Wallet]:
        ctx = _command_context(request, idempotency_key, data)
        command = OpenWallet(user_id=data.user_id, metadata=data.metadata)
        return await _command("open_wallet", store, command, ctx, Wallet)

    @get(
        "/{user_id:str}",
        summary="A wallet's balances and version, now or as of a past moment",
        responses=problem_responses(400, 404, 503),
        **scoped("ledger:read"),
    )
    async def get_wallet(
        self,
        state: State,
        pool: Pool,
        user_id: UserIdPath,
        consistent_with: ConsistentWith = None,
        as_of: Annotated[
            str | None,
            QueryParameter(
                description="An ISO 8601 time or a global position: the balances then, computed from the "
                "events (not the read model)."
            ),
        ] = None,
    ) -> Response[Wallet | WalletAsOf]:
        if as_of is not None:
            try:
                moment = Moment.parse(as_of)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            return Response(await wallet_as_of(pool, user_id, moment))
        await _wait(state, ("wallets",), consistent_with)
        wallet = await _complete(state, lambda: queries.get_wallet(pool, user_id))
        return Response(wallet, headers={"ETag": f'"{wallet.version}"'})

    top_up_credits = _transaction_route(TopUpCredits, "Top up (treasury to user)")
    grant_bonus = _transaction_route(GrantBonus, "Grant a bonus (bonus pool to user)")
    spend_credits = _transaction_route(SpendCredits, "Spend (user to revenue)")

    @post(
        "/{user_id:str}/holds",
        status_code=201,
        summary="Place a hold: reserve part of the available balance until it expires",
        responses=problem_responses(400, 404, 409, 422),
        dto=StrictBody[PlaceHoldRequest],
        return_dto=None,
        **scoped("holds:write"),
    )
    async def place_hold(
        self,
        request: Request[Any, Any, Any],
        user_id: UserIdPath,
        data: JSONBody[PlaceHoldRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Hold]:
        request.user.require_asset(data.asset)
        ctx = _command_context(request, idempotency_key, data)
        command = PlaceHold(user_id=user_id, **msgspec.structs.asdict(data))
        return await _command("place_hold", store, command, ctx, Hold)

    @get(
        "/{user_id:str}/holds",
        summary="A wallet's holds, newest first",
        responses=problem_responses(400, 404, 503),
        **scoped("ledger:read"),
    )
    async def wallet_holds(
        self,
        state: State,
        pool: Pool,
        user_id: UserIdPath,
        status: Annotated[
            Literal["active", "captured", "voided", "expired"] | None,
            QueryParameter(description="Only holds in this status."),
        ] = None,
        asset: Annotated[str | None, QueryParameter(pattern=ASSET_CODE_PATTERN)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
        consistent_with: ConsistentWith = None,
    ) -> HoldPage:
        await _wait(state, ("wallets",), consistent_with)
        try:
            queries.decode_cursor(cursor)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return await _complete(
            state,
            lambda: queries.wallet_holds(
                pool, user_id, status=status, asset=asset, limit=limit, cursor=cursor
            ),
        )

    @get(
        "/{user_id:str}/transactions",
        summary="A wallet's transactions, newest first",
        responses=problem_responses(400, 404, 503),
        **scoped("ledger:read"),
    )
    async def wallet_history(
        self,
        state: State,
        pool: Pool,
        user_id: UserIdPath,
        asset: Annotated[str | None, QueryParameter(pattern=ASSET_CODE_PATTERN)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
        consistent_with: ConsistentWith = None,
    ) -> TransactionPage:
        await _wait(state, ("history",), consistent_with)
        try:
            queries.decode_cursor(cursor)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return await _complete(
            state, lambda: queries.wallet_history(pool, user_id, asset=asset, limit=limit, cursor=cursor)
        )


async def _complete(state: State, read: Callable[[], Awaitable[T]]) -> T:
    """The read once the wallet's read model holds every version up to the newest it shows (a gap
    lasts one projection batch); ProjectionTimeout after the consistency timeout. Between tries it
    waits for the projections to move (their notification, or the watcher's poll), so a wallet
    that stays incomplete (a stopped projection) costs a query per step, not a query per 10 ms."""
    settings: Settings = state.settings
    watcher: ProjectionWatcher = state.watcher
    limiter: ReadLimiter = state.read_limiter
    deadline = asyncio.get_running_loop().time() + settings.consistency_timeout
    while True:
        try:
            return await read()
        except queries.WalletIncomplete as exc:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ProjectionTimeout(f"the read model of wallet {exc} is catching up") from None
            async with limiter.set_aside():
                await watcher.next_progress(min(remaining, 0.25))


def _uuid(value: str, missing: type[DomainError], what: str) -> str:
    """The id in its canonical form; ``missing`` (a 404) when it is no id Tally could have issued."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise missing(f"no {what} {value}") from None


class TransactionController(Controller):
    path = "/v1/transactions"
    tags = ["transactions"]

    @post(
        "/{transaction_id:str}/reversals",
        status_code=201,
        summary="Reverse (part of) a transaction: its legs negated, at most its amount in all",
        responses=problem_responses(400, 404, 409, 422),
        dto=StrictBody[ReverseRequest],
        return_dto=None,
        **scoped("credits:reverse"),
    )
    async def reverse_transaction(
        self,
        request: Request[Any, Any, Any],
        transaction_id: TransactionIdPath,
        data: JSONBody[ReverseRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Transaction]:
        ctx = _command_context(request, idempotency_key, data)
        target = _uuid(transaction_id, TransactionNotFound, "transaction")
        command = ReverseTransaction(transaction_id=target, **msgspec.structs.asdict(data))
        return await _command("reversal", store, command, ctx, Transaction)

    @get(
        "/{transaction_id:str}",
        summary="One transaction",
        responses=problem_responses(400, 404, 503),
        **scoped("ledger:read"),
    )
    async def get_transaction(
        self,
        state: State,
        pool: Pool,
        transaction_id: FromPath[str],
        consistent_with: ConsistentWith = None,
    ) -> Transaction:
        await _wait(state, ("history",), consistent_with)
        return await queries.get_transaction(pool, transaction_id)


class HoldController(Controller):
    path = "/v1/holds"
    tags = ["holds"]

    @get(
        "/{hold_id:str}",
        summary="One hold",
        responses=problem_responses(400, 404, 503),
        **scoped("ledger:read"),
    )
    async def get_hold(
        self, state: State, pool: Pool, hold_id: HoldIdPath, consistent_with: ConsistentWith = None
    ) -> Hold:
        await _wait(state, ("wallets",), consistent_with)
        return await _complete(state, lambda: queries.get_hold(pool, hold_id))

    @post(
        "/{hold_id:str}/captures",
        status_code=201,
        summary="Capture (part of) a hold: a spend of what it reserved",
        responses=problem_responses(400, 404, 409, 422),
        dto=StrictBody[CaptureRequest],
        return_dto=None,
        **scoped("holds:write"),
    )
    async def capture_hold(
        self,
        request: Request[Any, Any, Any],
        hold_id: HoldIdPath,
        data: JSONBody[CaptureRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Transaction]:
        ctx = _command_context(request, idempotency_key, data)
        command = CaptureHold(hold_id=_uuid(hold_id, HoldNotFound, "hold"), **msgspec.structs.asdict(data))
        return await _command("capture_hold", store, command, ctx, Transaction)

    @post(
        "/{hold_id:str}/void",
        status_code=200,
        summary="Void a hold: release what remains of it (the body is optional)",
        responses=problem_responses(400, 404, 409, 422),
        dto=StrictBody[VoidRequest],
        return_dto=None,
        **scoped("holds:write"),
    )
    async def void_hold(
        self,
        request: Request[Any, Any, Any],
        hold_id: HoldIdPath,
        store: Store,
        data: JSONBody[VoidRequest | None] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Hold]:
        body = data or VoidRequest()
        ctx = _command_context(request, idempotency_key, body)
        command = VoidHold(hold_id=_uuid(hold_id, HoldNotFound, "hold"), reason=body.reason)
        return await _command("void_hold", store, command, ctx, Hold, status_code=200)


class SystemController(Controller):
    path = "/v1/system"
    tags = ["system"]

    @get(
        "/balances",
        summary="System accounts and users' total per asset (sums to zero)",
        responses=problem_responses(400, 503),
        **scoped("ledger:read"),
    )
    async def system_balances(
        self, state: State, pool: Pool, consistent_with: ConsistentWith = None
    ) -> SystemBalances:
        await _wait(state, ("system",), consistent_with)
        return await queries.system_balances(pool)
