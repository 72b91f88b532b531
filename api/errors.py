"""Every error the API returns, mapped to RFC 9457 problem+json in this one place.

The write side stores and returns domain outcomes (``insufficient_funds``, ``version_mismatch``, …);
``STATUS_BY_CODE`` is the only place that gives them HTTP statuses."""

from __future__ import annotations

import logging
from typing import Any, Final, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.types import ExceptionHandlersMap

from api.auth import Forbidden, Unauthenticated
from api.ratelimit import RateLimited
from domain import DomainError
from projections.queries import TransactionNotFound
from projections.watcher import ProjectionTimeout

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
    "not_found": 404,
    "method_not_allowed": 405,
    "insufficient_funds": 409,
    "wallet_exists": 409,
    "asset_exists": 409,
    "version_mismatch": 412,
    "idempotency_key_reused": 422,
    "rate_limited": 429,
    "projection_timeout": 503,
    "internal_error": 500,
}


class InvalidRequest(Exception):
    code = "invalid_request"


class IdempotencyKeyMissing(Exception):
    code = "idempotency_key_missing"


def decode_strict(body: bytes, type_: type[T]) -> T:
    """Decode a JSON body with no type coercion; InvalidRequest names what is wrong."""
    try:
        return msgspec.json.decode(body, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


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


def _validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    extra = {"errors": exc.extra} if exc.extra else None
    return problem(request, "invalid_request", str(exc.detail), extra=extra)


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if exc.status_code == 404:
        return problem(request, "not_found", "no such resource")
    if exc.status_code == 405:
        return problem(request, "method_not_allowed", str(exc.detail))
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
    TransactionNotFound: _coded,
    ProjectionTimeout: _coded,
    ValidationException: _validation,
    HTTPException: _http,
    Exception: _internal,
}
