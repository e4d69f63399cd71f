"""Render every error to HTTP in one place.

FHIR routes (``/fhir``) answer an R4 ``OperationOutcome`` as
``application/fhir+json``; everything else (DICOMweb, health, admin) answers a
JSON error body. An app may name more path prefixes that answer OperationOutcomes
in ``app.state.outcome_prefixes`` (the hub's broker ``/dicomweb`` does, DESIGN.md
§2). Nothing ever leaks a traceback: an unexpected exception is logged with its
type and answered as a plain 500.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fhir.resources.R4B.operationoutcome import OperationOutcome
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from exchange.errors import ExchangeError, Issue, storage_failure

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FHIR_PREFIX = "/fhir"

_STATUS_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    503: "transient",
    507: "transient",
}


#: Whitespace a FHIR ``string`` may not hold (it allows space, CR, LF and tab only).
_ODD_SPACE = re.compile(r"[^\S \r\n\t]")


def _text(value: str) -> str | None:
    """``value`` as a FHIR string (an echoed client value may hold a form feed), or None."""
    return _ODD_SPACE.sub(" ", value) or None


def operation_outcome(
    message: str, code: str, severity: str = "error", issues: list[Issue] | None = None
) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [
        {"severity": issue.severity, "code": issue.code, "diagnostics": _text(issue.diagnostics)}
        | ({"expression": [_text(issue.expression)]} if issue.expression else {})
        for issue in issues or []
    ] or [{"severity": severity, "code": code, "diagnostics": _text(message)}]
    outcome = OperationOutcome.model_validate(
        {"resourceType": "OperationOutcome", "issue": entries}
    )
    return outcome.model_dump(mode="json", exclude_none=True)


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    issues: list[Issue] | None = None,
    outcome_prefixes: tuple[str, ...] = (FHIR_PREFIX,),
) -> Response:
    """The error body a client of ``path`` expects."""
    code = code or _STATUS_CODES.get(status, "exception")
    if any(path == prefix or path.startswith(prefix + "/") for prefix in outcome_prefixes):
        body = operation_outcome(message, code, issues=issues)
        media_type = FHIR_JSON
    else:
        body = {"error": {"status": status, "code": code, "message": message}}
        if issues:
            body["error"]["issues"] = [
                {"message": i.diagnostics, "expression": i.expression} for i in issues
            ]
        media_type = "application/json"
    return Response(json.dumps(body), status_code=status, media_type=media_type, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON"
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return 400, f"invalid request: {where}: {first.get('msg', 'invalid value')}"


def _outcome_prefixes(request: Request) -> tuple[str, ...]:
    prefixes: tuple[str, ...] = getattr(request.app.state, "outcome_prefixes", (FHIR_PREFIX,))
    return prefixes


def install(app: FastAPI) -> None:
    @app.exception_handler(ExchangeError)
    async def _exchange_error(request: Request, exc: ExchangeError) -> Response:
        if exc.status >= 500:
            log.warning(
                "request failed", extra={"error": type(exc).__name__, "path": request.url.path}
            )
        return error_response(
            request.url.path,
            exc.status,
            exc.message,
            code=exc.code,
            headers=exc.headers,
            issues=exc.issues,
            outcome_prefixes=_outcome_prefixes(request),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {
            404: f"no such resource or route: {request.url.path}",
            405: f"method {request.method} is not allowed here",
        }.get(exc.status_code, str(exc.detail))
        return error_response(
            request.url.path,
            exc.status_code,
            message,
            headers=dict(exc.headers or {}),
            outcome_prefixes=_outcome_prefixes(request),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        status, message = _validation_message(exc)
        return error_response(
            request.url.path, status, message, outcome_prefixes=_outcome_prefixes(request)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        refused = storage_failure(exc)
        if refused is not None:  # disk full or read-only: say so (507/503), not a bare 500
            return await _exchange_error(request, refused)
        log.error("unexpected error", extra={"error": type(exc).__name__, "path": request.url.path})
        return error_response(
            request.url.path,
            500,
            "internal error; it has been logged",
            code="exception",
            outcome_prefixes=_outcome_prefixes(request),
        )
