"""FHIR R4 models via ``fhir.resources.R4B`` (same shape as R4 for what we serve)."""

from __future__ import annotations

import json
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel as Resource
from pydantic import ValidationError

from exchange.errors import BadRequest, NotFound, Unprocessable

FHIR_VERSION = "4.0.1"

#: Resource types the index serves, and whether clients may write them.
SERVED: dict[str, bool] = {
    "ImagingStudy": True,
    "Patient": True,
    "Organization": True,
    "Endpoint": True,
    "Consent": True,
    "AuditEvent": False,  # written by the hub itself; append-only
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
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object (a FHIR resource)")
    return data


def validate(resource_type: str, data: dict[str, Any]) -> Resource:
    """Validate ``data`` as a ``resource_type``; 422 with the first problem otherwise."""
    found = data.get("resourceType")
    if found != resource_type:
        raise BadRequest(f"resourceType {found!r} does not match the URL ({resource_type})")
    model = get_fhir_model_class(resource_type)
    try:
        resource: Resource = model.model_validate(data)
        return resource
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or resource_type
        raise Unprocessable(f"invalid {resource_type}: {where}: {first['msg']}") from None


def to_json(resource: Resource) -> dict[str, Any]:
    dumped: dict[str, Any] = resource.model_dump(mode="json", exclude_none=True)
    return dumped
