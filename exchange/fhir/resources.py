"""FHIR R4 models via ``fhir.resources.R4B`` (same shape as R4 for what we serve)."""

from __future__ import annotations

import json
from typing import Any

from fhir_core.fhirabstractmodel import FHIRAbstractModel as Resource

from exchange.errors import BadRequest, NotFound, Unprocessable
from exchange.fhir import profiles

FHIR_VERSION = "4.0.1"

#: Resource types the index serves, and whether clients may write them.
SERVED: dict[str, bool] = {
    "ImagingStudy": True,
    "Patient": True,
    "Organization": True,
    "Endpoint": True,
    "Consent": True,
    "AuditEvent": False,  # written by the hub itself; append-only
    "Provenance": False,  # written by the hub itself (who made a provider share)
}


def served_type(resource_type: str) -> str:
    if resource_type not in SERVED:
        raise NotFound(f"resource type {resource_type!r} is not served here")
    return resource_type


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the request body nests too deeply to be a FHIR resource") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object (a FHIR resource)")
    if b"\\u0000" in body and _has_nul(data):
        # Not a valid FHIR string, and PostgreSQL text cannot hold it.
        raise BadRequest("the request body holds a NUL character (\\u0000), which FHIR forbids")
    return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def validate(resource_type: str, data: dict[str, Any]) -> Resource:
    """``data`` as a valid ``resource_type``, or 422 listing every problem (nothing is stored).

    R4B checks structure and datatypes; our profiles (``fhir_profiles/``) check
    terminology and the rules the index relies on. Both run, so a client sees
    all its mistakes at once.
    """
    found = data.get("resourceType")
    if found != resource_type:
        raise BadRequest(f"resourceType {found!r} does not match the URL ({resource_type})")
    resource, issues = profiles.parse(resource_type, data)
    issues = profiles.merge(issues, profiles.validate_profile(resource_type, data))
    if resource is None or any(issue.severity in ("error", "fatal") for issue in issues):
        raise Unprocessable(f"invalid {resource_type}: {len(issues)} problem(s)", issues=issues)
    return resource


def to_json(resource: Resource) -> dict[str, Any]:
    dumped: dict[str, Any] = resource.model_dump(mode="json", exclude_none=True)
    return dumped
