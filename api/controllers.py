"""HTTP controllers: validate, call one command handler or one query, return a Struct."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, TypeVar

import asyncpg
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import (
    FromPath,
    HeaderParameter,
    JSONBody,
    PathParameter,
    QueryParameter,
)

from api.dto import DefineAssetRequest, MoveCreditsRequest, OpenWalletRequest, Problem
from api.errors import IdempotencyKeyMissing, InvalidRequest, decode_strict
from api.observability import COMMANDS, REQUEST_ID
from api.settings import Settings
from commands import (
    Accepted,
    CommandContext,
    EventStore,
    IdempotencyKeyReused,
    handle_define_asset,
    handle_grant_bonus,
    handle_open_wallet,
    handle_spend_credits,
    handle_top_up_credits,
)
from domain import (
    DefineAsset,
    DomainError,
    GrantBonus,
    InsufficientFunds,
    OpenWallet,
    SpendCredits,
    TopUpCredits,
)
from domain.model import ASSET_CODE_PATTERN, USER_ID_PATTERN
from projections import queries
from projections.as_of import Moment, WalletAsOf, wallet_as_of
from projections.positions import Position
from projections.read_models import (
    Asset,
    AssetList,
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
Pool = NamedDependency[asyncpg.Pool]
UserIdPath = Annotated[str, PathParameter(pattern=USER_ID_PATTERN, description="The wallet owner's user id.")]


def _problems(*statuses: int) -> dict[int, ResponseSpec]:
    return {
        s: ResponseSpec(
            Problem, description="application/problem+json", media_type="application/problem+json"
        )
        for s in statuses
    }


async def _command_context(
    request: Request[Any, Any, Any],
    key: str | None,
    canonical_body: bytes,
    expected_version: int | None = None,
) -> CommandContext:
    """The idempotency record's identity: the key, and a fingerprint of method, path, the canonical
    body and the expected version (a retry must be the same request to replay; `"3"` and `3` in
    If-Match are the same precondition)."""
    if key is None:
        raise IdempotencyKeyMissing("every POST needs an Idempotency-Key header")
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    precondition = "" if expected_version is None else str(expected_version)
    fingerprint = CommandContext.fingerprint_of(
        request.method, request.url.path, canonical_body, precondition
    )
    metadata = {"path": request.url.path}
    if request_id := REQUEST_ID.get():
        metadata["request_id"] = request_id
    if client := request.headers.get("user-agent"):
        metadata["client"] = client[:128]
    return CommandContext(command_id=key, fingerprint=fingerprint, metadata=metadata)


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
        extra={"kind": kind, "idempotency_key": ctx.command_id, "outcome": outcome, **fields},
    )


async def _command(
    kind: str, ctx: CommandContext, pending: Awaitable[Accepted], type_: type[T]
) -> Response[T]:
    """Run a command handler; count its outcome and log it with its key and transaction id."""
    try:
        accepted = await pending
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
    except IdempotencyKeyReused:
        _record(kind, ctx, "rejected", code=IdempotencyKeyReused.code)
        raise
    result = msgspec.json.decode(accepted.body, type=type_)
    _record(
        kind,
        ctx,
        "replayed" if accepted.replayed else "accepted",
        transaction_id=getattr(result, "transaction_id", None),
        user_id=getattr(result, "user_id", None),
    )
    headers = {"Idempotent-Replayed": "true"} if accepted.replayed else {}
    return Response(result, status_code=201, headers=headers)


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
    deadline = asyncio.get_running_loop().time() + settings.consistency_timeout
    for projection in projections:
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        await watcher.wait_for(projection, token, remaining)


class AssetController(Controller):
    path = "/v1/assets"
    tags = ["assets"]

    @post(status_code=201, summary="Define an asset", responses=_problems(400, 409, 422))
    async def define_asset(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[DefineAssetRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Asset]:
        body = decode_strict(await request.body(), DefineAssetRequest)
        ctx = await _command_context(request, idempotency_key, msgspec.json.encode(body))
        command = DefineAsset(code=body.code, name=body.name, decimals=body.decimals)
        return await _command("define_asset", ctx, handle_define_asset(store, command, ctx), Asset)

    @get(summary="List assets", responses=_problems(400, 503))
    async def list_assets(
        self, state: State, pool: Pool, consistent_with: ConsistentWith = None
    ) -> AssetList:
        await _wait(state, ("wallets",), consistent_with)
        return await queries.list_assets(pool)


class WalletController(Controller):
    path = "/v1/wallets"
    tags = ["wallets"]

    @post(status_code=201, summary="Open a wallet", responses=_problems(400, 409, 422))
    async def open_wallet(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[OpenWalletRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Wallet]:
        body = decode_strict(await request.body(), OpenWalletRequest)
        ctx = await _command_context(request, idempotency_key, msgspec.json.encode(body))
        command = OpenWallet(user_id=body.user_id, metadata=body.metadata)
        return await _command("open_wallet", ctx, handle_open_wallet(store, command, ctx), Wallet)

    @get(
        "/{user_id:str}",
        summary="A wallet's balances and version, now or as of a past moment",
        responses=_problems(400, 404, 503),
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

    @post(
        "/{user_id:str}/top-ups",
        status_code=201,
        summary="Top up (treasury to user)",
        responses=_problems(400, 404, 412, 422),
    )
    async def top_up_credits(
        self,
        request: Request[Any, Any, Any],
        user_id: UserIdPath,
        data: JSONBody[MoveCreditsRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> Response[Transaction]:
        body, ctx, version = await _move_credits(request, idempotency_key, if_match)
        command = TopUpCredits(user_id=user_id, expected_version=version, **msgspec.structs.asdict(body))
        return await _command("top_up", ctx, handle_top_up_credits(store, command, ctx), Transaction)

    @post(
        "/{user_id:str}/bonuses",
        status_code=201,
        summary="Grant a bonus (bonus pool to user)",
        responses=_problems(400, 404, 412, 422),
    )
    async def grant_bonus(
        self,
        request: Request[Any, Any, Any],
        user_id: UserIdPath,
        data: JSONBody[MoveCreditsRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> Response[Transaction]:
        body, ctx, version = await _move_credits(request, idempotency_key, if_match)
        command = GrantBonus(user_id=user_id, expected_version=version, **msgspec.structs.asdict(body))
        return await _command("bonus", ctx, handle_grant_bonus(store, command, ctx), Transaction)

    @post(
        "/{user_id:str}/spends",
        status_code=201,
        summary="Spend (user to revenue)",
        responses=_problems(400, 404, 409, 412, 422),
    )
    async def spend_credits(
        self,
        request: Request[Any, Any, Any],
        user_id: UserIdPath,
        data: JSONBody[MoveCreditsRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> Response[Transaction]:
        body, ctx, version = await _move_credits(request, idempotency_key, if_match)
        command = SpendCredits(user_id=user_id, expected_version=version, **msgspec.structs.asdict(body))
        return await _command("spend", ctx, handle_spend_credits(store, command, ctx), Transaction)

    @get(
        "/{user_id:str}/transactions",
        summary="A wallet's transactions, newest first",
        responses=_problems(400, 404, 503),
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
        # The history lives in `history`; whether the wallet exists is read from `wallets`.
        await _wait(state, ("history", "wallets"), consistent_with)
        try:
            queries.decode_cursor(cursor)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return await _complete(
            state, lambda: queries.wallet_history(pool, user_id, asset=asset, limit=limit, cursor=cursor)
        )


async def _complete(state: State, read: Callable[[], Awaitable[T]]) -> T:
    """The read once the wallet's read model holds every version up to the newest it shows (a gap
    lasts one projection batch); ProjectionTimeout after the consistency timeout."""
    settings: Settings = state.settings
    deadline = asyncio.get_running_loop().time() + settings.consistency_timeout
    while True:
        try:
            return await read()
        except queries.WalletIncomplete as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise ProjectionTimeout(f"the read model of wallet {exc} is catching up") from None
            await asyncio.sleep(0.01)


async def _move_credits(
    request: Request[Any, Any, Any], key: str | None, if_match: str | None
) -> tuple[MoveCreditsRequest, CommandContext, int | None]:
    body = decode_strict(await request.body(), MoveCreditsRequest)
    version = _expected_version(if_match)
    ctx = await _command_context(request, key, msgspec.json.encode(body), version)
    return body, ctx, version


class TransactionController(Controller):
    path = "/v1/transactions"
    tags = ["transactions"]

    @get("/{transaction_id:str}", summary="One transaction", responses=_problems(400, 404, 503))
    async def get_transaction(
        self,
        state: State,
        pool: Pool,
        transaction_id: FromPath[str],
        consistent_with: ConsistentWith = None,
    ) -> Transaction:
        await _wait(state, ("history",), consistent_with)
        return await queries.get_transaction(pool, transaction_id)


class SystemController(Controller):
    path = "/v1/system"
    tags = ["system"]

    @get(
        "/balances",
        summary="System accounts and users' total per asset (sums to zero)",
        responses=_problems(400, 503),
    )
    async def system_balances(
        self, state: State, pool: Pool, consistent_with: ConsistentWith = None
    ) -> SystemBalances:
        await _wait(state, ("system",), consistent_with)
        return await queries.system_balances(pool)
