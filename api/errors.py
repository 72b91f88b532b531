"""Every error the API returns, mapped to RFC 9457 problem+json in this one place.

The write side stores and returns domain outcomes (``insufficient_funds``, ``version_mismatch``, …);
``STATUS_BY_CODE`` is the only place that gives them HTTP statuses."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import asyncpg
import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.types import ExceptionHandlersMap

from api.auth import Forbidden, Unauthenticated
from api.ratelimit import RateLimited
from commands.errors import Overloaded, Unavailable, describe, is_transient
from domain import DomainError
from projections.watcher import ProjectionTimeout
from projections.webhooks import UrlNotAllowed, WebhookKeyReused, WebhookNotFound, WebhooksNotConfigured

log = logging.getLogger("tally.api")
T = TypeVar("T")

PROBLEM_TYPE_BASE: Final = "https://tally.dev/problems/"

STATUS_BY_CODE: Final = {
    "invalid_request": 400,
    "idempotency_key_missing": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "wallet_not_found": 404,
    "asset_not_found": 404,
    "transaction_not_found": 404,
    "hold_not_found": 404,
    "not_found": 404,
    "webhook_not_found": 404,
    "url_not_allowed": 400,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "batch_too_large": 413,
    "insufficient_funds": 409,
    "wallet_exists": 409,
    "asset_exists": 409,
    "reversal_exceeds_remaining": 409,
    "not_reversible": 409,
    "capture_exceeds_hold": 409,
    "hold_expired": 409,
    "hold_not_active": 409,
    "batch_rejected": 409,
    "version_mismatch": 412,
    "idempotency_key_reused": 422,
    "not_applied": 424,
    "rate_limited": 429,
    "projection_timeout": 503,
    "unavailable": 503,
    "overloaded": 503,
    "webhooks_not_configured": 503,
    "internal_error": 500,
}


class InvalidRequest(Exception):
    code = "invalid_request"


class IdempotencyKeyMissing(Exception):
    code = "idempotency_key_missing"


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key repeats (``{"amount": 1, "amount": 50}`` would otherwise
    mean 50 to one parser and 1 to another) or a string holds a lone surrogate (``"\\ud800"``,
    which no UTF-8 text can carry, so it could be neither stored nor answered)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"the key {key!r} appears more than once in an object")
        for text in (key, value):
            if isinstance(text, str) and not text.isascii():
                text.encode()  # UnicodeEncodeError for a lone surrogate
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode_strict(body: bytes, type_: type[T]) -> T:
    """Decode a JSON body, once, with no type coercion; InvalidRequest names what is wrong.

    The text is parsed by the standard library's parser, because it can refuse duplicate keys
    (msgspec's cannot: the last one would win), then converted to ``type_`` by msgspec, strictly
    (a string, float or boolean is never taken for an integer). NaN and Infinity are refused, and so
    is nesting deep enough to exhaust the parser's stack: no body yields a 500."""
    try:
        parsed = json.loads(body.decode(), object_pairs_hook=_object, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("the body is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, UnicodeEncodeError
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    try:
        return msgspec.convert(parsed, type_, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None


def problem_details(code: str, detail: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The body of the problem+json answer ``problem`` gives (where one answer holds several, as a
    batch's per-command results do)."""
    return {
        "status": STATUS_BY_CODE[code],
        "type": PROBLEM_TYPE_BASE + code,
        "title": code.replace("_", " ").capitalize(),
        "detail": detail,
        "code": code,
        **(extra or {}),
    }


def problem(
    request: Request[Any, Any, Any],
    code: str,
    detail: str,
    *,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Any]:
    status = STATUS_BY_CODE[code]
    return ProblemDetailsException(
        status_code=status,
        title=code.replace("_", " ").capitalize(),
        detail=detail,
        type_=PROBLEM_TYPE_BASE + code,
        extra={"code": code, **(extra or {})},
        headers=headers,
    ).to_response(request)


def _domain_error(request: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    headers = {"Idempotent-Replayed": "true"} if exc.replayed else None
    return problem(request, exc.code, exc.detail, extra=exc.extra, headers=headers)


def _coded(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return problem(request, getattr(exc, "code", "invalid_request"), str(exc))


def _unauthenticated(request: Request[Any, Any, Any], exc: Unauthenticated) -> Response[Any]:
    return problem(request, exc.code, str(exc), headers={"WWW-Authenticate": 'Bearer realm="tally"'})


def _forbidden(request: Request[Any, Any, Any], exc: Forbidden) -> Response[Any]:
    return problem(request, exc.code, str(exc), extra=exc.extra)


def _rate_limited(request: Request[Any, Any, Any], exc: RateLimited) -> Response[Any]:
    return problem(request, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after)})


def _unavailable(request: Request[Any, Any, Any], exc: Unavailable | Overloaded) -> Response[Any]:
    return problem(request, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after)})


def _database(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The database failed a request: 503 when it was away, slow or busy (try again later), else
    a bug (500)."""
    if not is_transient(exc):
        return _internal(request, exc)
    log.warning("database unavailable on %s %s: %r", request.method, request.url.path, exc)
    return problem(request, "unavailable", describe(exc), headers={"Retry-After": "1"})


def _validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    extra = {"errors": exc.extra} if exc.extra else None
    return problem(request, "invalid_request", str(exc.detail), extra=extra)


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if exc.status_code == 404:
        return problem(request, "not_found", "no such resource")
    if exc.status_code == 405:  # with the Allow header Litestar names the methods in
        return problem(request, "method_not_allowed", str(exc.detail), headers=dict(exc.headers or {}))
    if exc.status_code == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        return problem(request, "payload_too_large", f"the body is larger than this route's {limit} bytes")
    if exc.status_code < 500:
        return problem(request, "invalid_request", str(exc.detail))
    return _internal(request, exc)


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(request, "internal_error", "the server could not complete the request")


EXCEPTION_HANDLERS: Final[ExceptionHandlersMap] = {
    DomainError: _domain_error,
    Unauthenticated: _unauthenticated,
    Forbidden: _forbidden,
    RateLimited: _rate_limited,
    IdempotencyKeyMissing: _coded,
    InvalidRequest: _coded,
    ProjectionTimeout: _coded,
    WebhookNotFound: _coded,
    WebhookKeyReused: _coded,
    WebhooksNotConfigured: _coded,
    UrlNotAllowed: _coded,
    Unavailable: _unavailable,
    Overloaded: _unavailable,
    asyncpg.PostgresError: _database,
    asyncpg.InterfaceError: _database,
    OSError: _database,
    TimeoutError: _database,
    ValidationException: _validation,
    HTTPException: _http,
    Exception: _internal,
}
