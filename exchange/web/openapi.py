"""What the OpenAPI documents (``/openapi.json``) say about answers, kept true to the wire.

FastAPI documents every route as answering ``application/json`` and a 422 validation
error. Ours do not: FHIR routes answer ``application/fhir+json``, DICOMweb answers
``application/dicom+json`` or ``multipart/related``, and every error goes through
``exchange.web.errors`` (400 for invalid input, an ``OperationOutcome`` under the FHIR
and broker prefixes, a JSON error body elsewhere). API fuzzing (schemathesis) holds the
services to their documents, so routes declare their success answers with the helpers
here and :func:`install` adds the error answers the shared error layer produces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

FHIR_JSON = "application/fhir+json"
DICOM_JSON = "application/dicom+json"
MULTIPART = "multipart/related"

#: An R4 OperationOutcome as ``exchange.web.errors`` writes it.
OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"enum": ["fatal", "error", "warning", "information"]},
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                },
            },
        },
    },
}

#: The JSON error body of non-FHIR routes.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "code", "message"],
            "properties": {
                "status": {"type": "integer"},
                "code": {"type": "string"},
                "message": {"type": "string"},
            },
        }
    },
}

#: Any FHIR resource (the profiles are checked by the hub, not by the document).
RESOURCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {"resourceType": {"type": "string", "pattern": "^[A-Z][A-Za-z]{1,63}$"}},
}

_BINARY: dict[str, Any] = {"type": "string", "format": "binary"}

_DESCRIPTIONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Invalid request (parameters, path, body)",
    401: "No token, or a token that is not valid here (see WWW-Authenticate)",
    403: "Refused: the reason is in the body",
    404: "No such resource or route",
    406: "None of the accepted media types can be produced",
    409: "Conflicts with what is stored",
    410: "Deleted",
    412: "A precondition (If-Match, conditional update) failed",
    413: "The body is larger than allowed",
    415: "Unsupported request media type",
    422: "Understood but not processable (e.g. profile validation)",
    429: "Too many requests",
    501: "Not implemented by this deployment",
    502: "The holding site answered with an error",
    503: "Unavailable (a dependency such as the audit store or a site is down)",
    504: "The holding site did not answer in time",
}

#: Paths anyone may call without a token (discovery, health, keys).
PUBLIC = re.compile(
    r"^/(healthz|readyz|openapi\.json|fhir/metadata|\.well-known/.*|"
    r"idp/.*|fhir/\.well-known/.*|viewer.*)$"
)


def content(media_type: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {media_type: {"schema": dict(schema or {})}}


def fhir_ok(*statuses: int, schema: Mapping[str, Any] | None = None) -> dict[int | str, Any]:
    """Success answers of a FHIR route: a resource (or none, e.g. ``return=minimal``)."""
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, "OK"),
            "content": content(FHIR_JSON, schema or RESOURCE_SCHEMA),
        }
        for status in statuses
    }


def dicom_json_ok() -> dict[int | str, Any]:
    """QIDO-RS results and WADO-RS metadata: a JSON array of DICOM JSON datasets."""
    schema = {"type": "array", "items": {"type": "object"}}
    return {
        200: {"description": "DICOM JSON", "content": content(DICOM_JSON, schema)},
        204: {"description": "No match (some clients are answered so)"},
    }


def multipart_ok(description: str) -> dict[int | str, Any]:
    """WADO-RS instances, frames and bulk data: ``multipart/related`` parts."""
    return {200: {"description": description, "content": content(MULTIPART, _BINARY)}}


def image_ok() -> dict[int | str, Any]:
    """Rendered images and thumbnails."""
    images = {"image/png": {"schema": _BINARY}, "image/jpeg": {"schema": _BINARY}}
    images |= {"image/gif": {"schema": _BINARY}}
    return {200: {"description": "The rendered image", "content": images}}


def path_parameters(template: str) -> list[dict[str, Any]]:
    """OpenAPI path parameters for a route whose endpoint reads ``request.path_params``."""
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{([^}]+)}", template)
    ]


def _errors(statuses: Iterable[int], outcome: bool) -> dict[str, Any]:
    body = (
        content(FHIR_JSON, OUTCOME_SCHEMA) if outcome else content("application/json", ERROR_SCHEMA)
    )
    return {str(s): {"description": _DESCRIPTIONS[s], "content": body} for s in statuses}


def _error_statuses(path: str, method: str, operation: Mapping[str, Any]) -> list[int]:
    """The client errors the shared layers can answer for one operation."""
    statuses = [400, 404, 413, 429]
    if not PUBLIC.match(path):
        statuses += [401, 403]
    if method in ("post", "put", "patch"):
        statuses += [409, 412, 415, 422]
    if path.startswith("/fhir"):
        statuses += [410, 412, 422, 501, 503]  # deleted; conditions; profiles; audit down
    if path.startswith("/dicomweb"):
        statuses += [406, 503]
    if path == "/readyz":
        statuses.append(503)
    return sorted(set(statuses))


def install(app: FastAPI, outcome_prefixes: Callable[[], tuple[str, ...]]) -> None:
    """Make ``app.openapi()`` document the shared error answers of every operation: drop
    FastAPI's 422 validation error (ours is a 400) and add what ``exchange.web.errors``
    renders, as an OperationOutcome under ``outcome_prefixes()`` and JSON elsewhere."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        prefixes = outcome_prefixes()
        for path, item in document.get("paths", {}).items():
            outcome = any(path == p or path.startswith(p + "/") for p in prefixes)
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                generic = responses.get("422", {}).get("content", {}).get("application/json", {})
                if "HTTPValidationError" in str(generic):
                    del responses["422"]
                for status, answer in _errors(
                    _error_statuses(path, method, operation), outcome
                ).items():
                    responses.setdefault(status, answer)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def dicomweb_ok(path: str, method: str = "get") -> dict[int | str, Any]:
    """The success answers of a DICOMweb route, from its path (PS3.18 resources)."""
    if method == "post":  # STOW-RS: the store response, also when some parts failed
        schema = {"type": "object"}
        return {
            status: {"description": text, "content": content(DICOM_JSON, schema)}
            for status, text in (
                (200, "All instances stored"),
                (202, "Some instances stored, some refused (see FailedSOPSequence)"),
                (409, "No instance stored (see FailedSOPSequence)"),
            )
        }
    if method == "delete":
        return {200: {"description": "Deleted", "content": content("application/json")}}
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last in ("rendered", "thumbnail"):
        return image_ok()
    if last in ("metadata", "series", "instances", "studies"):
        return dicom_json_ok()
    return multipart_ok("Instances, frames or bulk data as multipart/related parts")


def html_ok(*statuses: int) -> dict[int | str, Any]:
    """A page (the development IdP's sign-in form and its refusals)."""
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, "A page"),
            "content": content("text/html"),
        }
        for status in statuses
    }


_OAUTH_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}


def oauth_token_answers() -> dict[int | str, Any]:
    """An OAuth 2.0 token endpoint (RFC 6749 §5): a token, or an OAuth error object."""
    token = {
        "type": "object",
        "required": ["access_token", "token_type"],
        "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string"}},
    }
    return {
        200: {"description": "A token", "content": content("application/json", token)},
        400: {"description": "OAuth error", "content": content("application/json", _OAUTH_ERROR)},
        401: {
            "description": "Client refused",
            "content": content("application/json", _OAUTH_ERROR),
        },
    }


def form_body(*fields: str) -> dict[str, Any]:
    """An ``application/x-www-form-urlencoded`` request body with these (string) fields."""
    schema = {"type": "object", "properties": {f: {"type": "string"} for f in fields}}
    return {"requestBody": {"content": content("application/x-www-form-urlencoded", schema)}}
