"""Provider sharing over HTTP: FHIR operations ``$share`` and ``$revoke``, and an operator list.

- ``POST /fhir/ImagingStudy/{id}/$share`` (``Parameters``: ``recipient`` Reference,
  repeatable; ``purpose`` Coding or code, default TREAT; ``end`` date/dateTime or
  ``days``; ``note`` string) -> 201 with the Consent and its ``Location``.
- ``POST /fhir/Consent/{id}/$revoke`` (no body) -> 200 with the Consent, now ``inactive``.
- ``GET /admin/shares?patient=<id>`` (HIE operators) -> the shares in force, as JSON.

What is decided and written is in ``exchange.hub.sharing``; these only speak HTTP.
"""

from __future__ import annotations

import json
from email.utils import format_datetime
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from exchange.errors import BadRequest, UnsupportedMediaType
from exchange.fhir import resources
from exchange.fhir.repository import Stored
from exchange.hub import sharing
from exchange.hub.deps import CurrentPrincipal, Services
from exchange.web import openapi
from exchange.web.errors import FHIR_JSON

router = APIRouter(tags=["sharing"])

_JSON_TYPES = ("application/fhir+json", "application/json")


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


def _consent_response(stored: Stored, status: int, base: str) -> Response:
    headers = {
        "ETag": stored.etag,
        "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
        "Location": f"{base}/fhir/Consent/{stored.id}/_history/{stored.version}",
    }
    body = json.dumps(stored.body, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)


async def _parameters(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES:
        raise UnsupportedMediaType("send the Parameters resource as application/fhir+json")
    body = resources.parse_json(await request.body())
    if body.get("resourceType") != "Parameters":
        raise BadRequest("$share takes a FHIR Parameters resource")
    return body


@router.post(
    "/fhir/ImagingStudy/{rid}/$share",
    response_class=Response,
    status_code=201,
    responses=openapi.fhir_ok(201),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": openapi.content(FHIR_JSON, openapi.RESOURCE_SCHEMA),
        }
    },
)
async def share(
    rid: str, request: Request, services: Services, principal: CurrentPrincipal
) -> Response:
    asked = sharing.parse_parameters(await _parameters(request))
    address = _address(request)
    stored = await anyio.to_thread.run_sync(
        lambda: sharing.share_study(services, principal, rid, asked, address)
    )
    return _consent_response(stored, 201, services.settings.base_url())


@router.post("/fhir/Consent/{rid}/$revoke", response_class=Response, responses=openapi.fhir_ok(200))
async def revoke(
    rid: str, request: Request, services: Services, principal: CurrentPrincipal
) -> Response:
    address = _address(request)
    stored = await anyio.to_thread.run_sync(
        lambda: sharing.revoke_share(services, principal, rid, address)
    )
    return _consent_response(stored, 200, services.settings.base_url())


@router.get("/admin/shares")
async def list_shares(
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
    patient: str | None = None,
) -> dict[str, Any]:
    if not patient:
        raise BadRequest("say whose shares to list: /admin/shares?patient=<Patient id>")
    patient_id = patient.removeprefix("Patient/")
    address = _address(request)
    found = await anyio.to_thread.run_sync(
        lambda: sharing.list_shares(services, principal, patient_id, address)
    )
    return {"patient": patient_id, "shares": [s.as_json() for s in found]}
