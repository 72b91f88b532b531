"""POST /v1/batches: many top-ups, bonuses and spends in one request.

Each command of a batch is the command its ``key`` names in the caller's namespace, exactly as if
sent alone to its own route (POST /v1/wallets/{user_id}/spends, ...): same fingerprint, same scope,
same decision, same recorded outcome. So a command sent alone after being in a batch, or in a
second batch, replays. The batch's own Idempotency-Key replays the batch's whole answer
(migrations/0010_batches.sql)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Final, Literal

import msgspec
from litestar import Controller, Request, Response, post
from litestar.datastructures import State
from litestar.params import JSONBody

from api.auth import Forbidden, Principal, scoped_any
from api.controllers import (
    FLOW_ROUTES,
    IdempotencyKey,
    Store,
    flow_path,
    idempotency_key_of,
    problem_responses,
    request_fingerprint,
    request_metadata,
)
from api.dto import MoveCreditsRequest, StrictBody
from api.errors import problem, problem_details
from api.observability import COMMANDS
from api.settings import Settings
from commands import CommandContext
from commands.event_store import UNAVAILABLE, WALLET_LOCKED, BatchResult, BatchSession, CommandRecord
from domain import ACCEPTED, FLOWS_BY_KIND
from domain.values import Amount, AssetCode, Metadata, UserId
from domain.values import Reference as TxReference
from projections.read_models import Transaction

log = logging.getLogger("tally.commands")

# A command's key, as the Idempotency-Key header of a command sent alone.
CommandKey = Annotated[str, msgspec.Meta(pattern=r"^[\x20-\x7e]{1,255}(?!\n)$")]
_NOT_APPLIED: Final = "not_applied"
REUSED: Final = "idempotency_key_reused"
_REUSED_BODY: Final = msgspec.json.encode(
    {"code": REUSED, "detail": "this key was used for a different command earlier in this batch"}
).decode()
_NOT_APPLIED_BODY: Final = msgspec.json.encode(
    {"code": _NOT_APPLIED, "detail": "the atomic batch was rejected: this command was not applied"}
).decode()


class BatchCommand(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One command of a batch: what its route takes, plus its kind, wallet and key."""

    kind: Literal["top_up", "bonus", "spend"]
    user_id: UserId
    asset: AssetCode
    amount: Amount
    key: CommandKey
    reference: TxReference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class BatchRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``commands`` (1 to TALLY_MAX_BATCH, default 1,000), decided in request order per wallet.
    ``atomic``: all of them or, when any would be refused, none (409 ``batch_rejected``)."""

    commands: Annotated[list[BatchCommand], msgspec.Meta(min_length=1)]
    atomic: bool = False


class BatchItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One command's answer: the status and body it would have had alone (``transaction`` or
    ``problem``); ``replayed`` when its key had decided it before. In a rejected atomic batch, a
    command that was not refused itself is 424 ``not_applied``."""

    index: int
    key: str
    status: int
    replayed: bool = False
    transaction: Transaction | None = None
    problem: dict[str, Any] | None = None


class BatchAnswer(msgspec.Struct, frozen=True, kw_only=True):
    results: list[BatchItem]


def _item(index: int, key: str, outcome: str, body: str, replayed: bool) -> BatchItem:
    if outcome == ACCEPTED:
        transaction = msgspec.json.decode(body, type=Transaction)
        return BatchItem(index=index, key=key, status=201, replayed=replayed, transaction=transaction)
    fields = msgspec.json.decode(body)
    code = UNAVAILABLE if outcome == WALLET_LOCKED else fields.pop("code", outcome)
    details = problem_details(code, fields.pop("detail", ""), fields)
    return BatchItem(index=index, key=key, status=details["status"], replayed=replayed, problem=details)


class BatchController(Controller):
    path = "/v1/batches"
    tags = ["batches"]

    @post(
        status_code=200,
        summary="Send a batch of top-ups, bonuses and spends",
        description="Each command needs the scope of its kind (`credits:top-up`, `credits:bonus`, "
        "`credits:spend`, or `admin`); a key with none of them is refused 403. Each command carries "
        "its own idempotency `key`, shared with commands sent alone. Non-atomic (the default): 200 "
        "with every command's status and body as it would have had alone. Atomic: 200 when every "
        "command was applied, else 409 `batch_rejected` (nothing applied) with the same results.",
        responses=problem_responses(400, 409, 413, 422, 503),
        dto=StrictBody[BatchRequest],
        return_dto=None,
        **scoped_any(*(scope for _, scope in FLOW_ROUTES.values())),
    )
    async def post_batch(
        self,
        request: Request[Any, Any, Any],
        state: State,
        data: JSONBody[BatchRequest],
        store: Store,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[BatchAnswer]:
        settings: Settings = state.settings
        principal: Principal = request.user
        batch_key = idempotency_key_of(idempotency_key)
        commands = data.commands
        if len(commands) > settings.max_batch:
            return problem(
                request, "batch_too_large",
                f"a batch holds at most {settings.max_batch} commands (TALLY_MAX_BATCH); this one has "
                f"{len(commands)}", extra={"max_batch": settings.max_batch},
            )  # fmt: skip
        fingerprint, _ = request_fingerprint(request.method, request.url.path, data)
        async with store.batch(principal.client_id, batch_key) as session:
            recorded = await session.answer(principal.client_id, batch_key, fingerprint)
            if recorded is None:
                result = await _decide(session, principal, request_metadata(request), data)
                if not _decided(result):  # not recorded: sent again, each command replays or applies once
                    return _answer(request, data, result, replayed=False)
                keys = [command.key for command in commands]
                if await session.record(
                    principal.client_id, batch_key, fingerprint, atomic=data.atomic, result=result, keys=keys
                ):
                    return _answer(request, data, result, replayed=False)
                # Recorded meanwhile by a writer that took no claim (cannot happen): that answer stands.
                recorded = await session.answer(principal.client_id, batch_key, fingerprint)
                assert recorded is not None  # recorded rows are never removed
        if not recorded.same_request:
            return problem(
                request, "idempotency_key_reused", "this Idempotency-Key was used for a different batch"
            )
        return _answer(request, data, recorded.result, replayed=True)


def _decided(result: BatchResult) -> bool:
    return all(outcome not in {UNAVAILABLE, WALLET_LOCKED} for outcome, _, _ in result.outcomes)


def _forbidden(principal: Principal, command: BatchCommand) -> tuple[str, str, bool] | None:
    """The refusal of a command its caller may not send (403, not recorded), as an outcome."""
    scope = FLOW_ROUTES[command.kind][1]
    refusal: Forbidden | None = None
    if not principal.allows(scope):
        refusal = Forbidden(f"this key lacks the scope {scope}", scope=scope)
    elif principal.assets is not None and command.asset not in principal.assets:
        refusal = Forbidden(f"this key may not use asset {command.asset}", asset=command.asset)
    if refusal is None:
        return None
    body = {"code": refusal.code, "detail": str(refusal), **refusal.extra}
    return refusal.code, msgspec.json.encode(body).decode(), False


def _record_of(principal: Principal, metadata: dict[str, str], command: BatchCommand) -> CommandRecord:
    """The command as it would be sent alone to its route: its key, its route's fingerprint."""
    alone = MoveCreditsRequest(
        asset=command.asset, amount=command.amount, reference=command.reference, metadata=command.metadata
    )
    fingerprint, legacy = request_fingerprint("POST", flow_path(command.kind, command.user_id), alone)
    ctx = CommandContext(
        command_id=command.key,
        client_id=principal.client_id,
        created_by=principal.name,
        fingerprint=fingerprint,
        metadata=metadata,
        legacy_fingerprint=legacy,
    )
    flow_command = FLOWS_BY_KIND[command.kind].command(
        user_id=command.user_id, asset=command.asset, amount=command.amount,
        reference=command.reference, metadata=command.metadata,
    )  # fmt: skip
    return CommandRecord.of(ctx, flow_command)


async def _decide(
    session: BatchSession, principal: Principal, metadata: dict[str, str], data: BatchRequest
) -> BatchResult:
    """Every command's outcome, in request order: refused here for want of a scope or an asset;
    a repeated key answered as its first occurrence (422 when its content differs), never sent;
    the rest decided by the event store. A rejected atomic batch answers 424 ``not_applied`` for
    each command it would have applied."""
    outcomes: list[tuple[str, str, bool]] = [("", "", False)] * len(data.commands)
    records: list[CommandRecord] = []
    sent: list[int] = []
    first: dict[str, tuple[int, bytes]] = {}  # key -> its first occurrence, and that one's fingerprint
    repeats: dict[int, int] = {}  # a repeat of a key -> its first occurrence
    for i, command in enumerate(data.commands):
        record = _record_of(principal, metadata, command)
        occurrence = first.setdefault(command.key, (i, record.fingerprint.encode()))
        if occurrence[0] != i:
            if occurrence[1] == record.fingerprint.encode():
                repeats[i] = occurrence[0]
            else:
                outcomes[i] = (REUSED, _REUSED_BODY, False)
            continue
        refusal = _forbidden(principal, command)
        if refusal is not None:
            outcomes[i] = refusal
        else:
            records.append(record)
            sent.append(i)
    refused = len(sent) + len(repeats) < len(outcomes)
    decided = (
        await session.post(records, atomic=data.atomic, reject=refused)
        if records
        else BatchResult([], applied=not data.atomic)
    )
    for i, outcome in zip(sent, decided.outcomes, strict=True):
        outcomes[i] = outcome
    applied = not data.atomic or (decided.applied and not refused)
    if not applied:
        outcomes = [
            (_NOT_APPLIED, _NOT_APPLIED_BODY, False) if o == ACCEPTED and not replayed else (o, b, replayed)
            for o, b, replayed in outcomes
        ]
    for i, j in repeats.items():
        its, body, _ = outcomes[j]
        outcomes[i] = (its, body, its not in {UNAVAILABLE, _NOT_APPLIED})
    return BatchResult(outcomes, applied=applied)


def _answer(
    request: Request[Any, Any, Any], data: BatchRequest, result: BatchResult, *, replayed: bool
) -> Response[BatchAnswer]:
    """The HTTP answer: 200 with every command's result, or 409 ``batch_rejected`` with them. Each
    command counts in the commands metric; the batch is one log line."""
    items = []
    counts: dict[str, int] = {}
    for i, (command, (outcome, body, was_replayed)) in enumerate(
        zip(data.commands, result.outcomes, strict=True)
    ):
        item = _item(i, command.key, outcome, body, was_replayed)
        label = (
            "replayed" if item.replayed
            else "accepted" if item.status == 201
            else "insufficient_funds" if outcome == "insufficient_funds"
            else "rejected"
        )  # fmt: skip
        COMMANDS.labels(command.kind, label).inc()
        counts[label] = counts.get(label, 0) + 1
        items.append(item)
    log.info(
        "batch of %d commands%s%s",
        len(items),
        " (atomic)" if data.atomic else "",
        "" if result.applied else ": rejected",
        extra={
            "batch": True,
            "atomic": data.atomic,
            "applied": result.applied,
            "replayed": replayed,
            **counts,
        },
    )
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    if not result.applied:
        refused = [item.index for item in items if item.status not in {201, 424}]
        return problem(
            request, "batch_rejected",
            f"the atomic batch was rejected: nothing was applied (refused: commands {refused})",
            extra={"refused": refused, "results": msgspec.to_builtins(items)}, headers=headers,
        )  # fmt: skip
    return Response(BatchAnswer(results=items), status_code=200, headers=headers)
