"""Webhook subscriptions over HTTP (scope ``webhooks:manage``): a client manages its own, and its
deliveries carry only what its key may read (its asset allowlist). What a subscription is and how
its secret is kept: projections/webhooks.py; how deliveries are sent: projections/dispatcher.py.

Each POST needs an Idempotency-Key, in a namespace of its own per client and route kind (creating,
rotating, replaying): the same request again replays the first answer (a created secret is derived
again, never stored), another request under a used key is 422."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import asyncpg
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.auth import Forbidden, Principal, scoped
from api.controllers import IdempotencyKey, Pool, idempotency_key_of, problem_responses
from api.dto import StrictBody
from api.errors import InvalidRequest
from api.settings import Settings
from domain.values import NO_NUL
from projections import webhooks
from projections.dispatcher import DispatchSettings
from projections.positions import ORIGIN, Position
from projections.webhooks import (
    DEFAULT_GRACE,
    MAX_GRACE,
    DeliveryPage,
    HostPolicy,
    Replayed,
    SecretRotated,
    WebhookCreated,
    WebhookView,
)

Url = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=2048, pattern=NO_NUL, description="http(s) URL deliveries are POSTed to"
    ),
]
MAX_TYPES: Final = 32
WebhookIdPath = Annotated[str, PathParameter(description="The webhook's id (webhook_id).")]


class CreateWebhookRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: Url
    types: (
        Annotated[
            list[Annotated[str, msgspec.Meta(max_length=64)]],
            msgspec.Meta(
                min_length=1, max_length=MAX_TYPES, description="Event types to deliver; omitted: all."
            ),
        ]
        | None
    ) = None
    description: Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)] | None = None


class RotateSecretRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional: a rotation may be sent with no body."""

    grace_seconds: (
        Annotated[
            float,
            msgspec.Meta(
                ge=0, le=MAX_GRACE, description="How long the previous secret keeps signing (default a day)."
            ),
        ]
        | None
    ) = None


class ReplayRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional: a replay with no body (or no ``after``) sends again from the feed's first event."""

    after: (
        Annotated[
            str, msgspec.Meta(max_length=41, description="A feed cursor; events after it are sent again.")
        ]
        | None
    ) = None


class WebhookList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[WebhookView]


def dispatch_settings(settings: Settings) -> DispatchSettings | None:
    """What the dispatcher needs of the configuration; None when webhooks are off (no
    TALLY_WEBHOOK_KEY: nothing could be signed)."""
    if settings.webhook_key is None:
        return None
    return DispatchSettings(
        key=settings.webhook_key.encode(),
        policy=HostPolicy.parse(settings.webhook_allowed_hosts),
        timeout=settings.webhook_timeout,
        retry_seconds=settings.webhook_retry_seconds,
        first_backoff=settings.webhook_backoff,
        poll_interval=settings.projector_poll_interval,
    )


def _key(state: State) -> bytes | None:
    settings: Settings = state.settings
    return None if settings.webhook_key is None else settings.webhook_key.encode()


def _replayed(body: Any, status: int, replayed: bool) -> Response[Any]:
    return Response(body, status_code=status, headers={"Idempotent-Replayed": "true"} if replayed else {})


class WebhookController(Controller):
    path = "/v1/webhooks"
    tags = ["webhooks"]

    @post(
        summary="Subscribe a URL to the event feed (the signing secret is shown once)",
        status_code=201,
        responses=problem_responses(400, 422, 503),
        dto=StrictBody[CreateWebhookRequest],
        return_dto=None,
        **scoped("webhooks:manage"),
    )
    async def create_webhook(
        self,
        request: Request[Principal, None, State],
        state: State,
        data: JSONBody[CreateWebhookRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[WebhookCreated]:
        key = idempotency_key_of(idempotency_key)
        if not request.user.allows("events:read"):  # a subscription delivers the feed
            raise Forbidden(
                "a webhook delivers the event feed: this key lacks the scope events:read", scope="events:read"
            )
        try:
            types = webhooks.validate_types(data.types)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        policy: HostPolicy = state.webhook_policy
        await policy.check(data.url)
        pool: asyncpg.Pool = state.pool
        made, replayed = await webhooks.create_webhook(
            pool, _key(state), request.user.client_id, key, data.url, types, data.description
        )
        return _replayed(made, 201, replayed)

    @get(summary="This client's webhooks", responses=problem_responses(503), **scoped("webhooks:manage"))
    async def list_webhooks(self, request: Request[Principal, None, State], pool: Pool) -> WebhookList:
        return WebhookList(items=await webhooks.list_webhooks(pool, request.user.client_id))

    @get(
        "/{webhook_id:str}",
        summary="A webhook",
        responses=problem_responses(404, 503),
        **scoped("webhooks:manage"),
    )
    async def get_webhook(
        self, request: Request[Principal, None, State], pool: Pool, webhook_id: WebhookIdPath
    ) -> WebhookView:
        return await webhooks.get_webhook(pool, request.user.client_id, webhook_id)

    @delete(
        "/{webhook_id:str}",
        summary="Delete a webhook: nothing more is delivered to it",
        status_code=204,
        responses=problem_responses(404, 503),
        **scoped("webhooks:manage"),
    )
    async def delete_webhook(
        self, request: Request[Principal, None, State], state: State, webhook_id: WebhookIdPath
    ) -> None:
        await webhooks.delete_webhook(state.pool, request.user.client_id, webhook_id)

    @post(
        "/{webhook_id:str}/rotate-secret",
        summary="A new signing secret; the previous one also signs for a grace period (the body is optional)",
        status_code=200,
        responses=problem_responses(400, 404, 422, 503),
        dto=StrictBody[RotateSecretRequest],
        return_dto=None,
        **scoped("webhooks:manage"),
    )
    async def rotate_secret(
        self,
        request: Request[Principal, None, State],
        state: State,
        webhook_id: WebhookIdPath,
        data: JSONBody[RotateSecretRequest | None] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[SecretRotated]:
        key = idempotency_key_of(idempotency_key)
        grace = DEFAULT_GRACE if data is None or data.grace_seconds is None else data.grace_seconds
        rotated, replayed = await webhooks.rotate_secret(
            state.pool, _key(state), request.user.client_id, webhook_id, key, grace
        )
        return _replayed(rotated, 200, replayed)

    @get(
        "/{webhook_id:str}/deliveries",
        summary="A webhook's deliveries, newest event first: attempts, statuses, next retry",
        responses=problem_responses(400, 404, 503),
        **scoped("webhooks:manage"),
    )
    async def list_deliveries(
        self,
        request: Request[Principal, None, State],
        pool: Pool,
        webhook_id: WebhookIdPath,
        status: Annotated[Literal["pending", "delivered", "parked"] | None, QueryParameter()] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, QueryParameter(description="next_cursor of the previous page")] = None,
    ) -> DeliveryPage:
        before = None
        if cursor is not None:
            try:
                before = Position.parse(cursor)
            except ValueError:
                raise InvalidRequest(f"{cursor!r} is not a cursor of this list") from None
        return await webhooks.deliveries(pool, request.user.client_id, webhook_id, status, limit, before)

    @post(
        "/{webhook_id:str}/replay",
        summary="Send the events after a cursor again (the body is optional: from the first event)",
        status_code=202,
        responses=problem_responses(400, 404, 422, 503),
        dto=StrictBody[ReplayRequest],
        return_dto=None,
        **scoped("webhooks:manage"),
    )
    async def replay(
        self,
        request: Request[Principal, None, State],
        state: State,
        webhook_id: WebhookIdPath,
        data: JSONBody[ReplayRequest | None] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Replayed]:
        key = idempotency_key_of(idempotency_key)
        after = ORIGIN
        if data is not None and data.after is not None:
            try:
                after = Position.parse(data.after)
            except ValueError:
                raise InvalidRequest(f"{data.after!r} is not a cursor of the event feed") from None
        done, replayed = await webhooks.replay(state.pool, request.user.client_id, webhook_id, after, key)
        return _replayed(done, 202, replayed)
