"""FHIR R4 REST at ``/fhir``: thin routes over the resource store."""

from __future__ import annotations

import json
from email.utils import format_datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from exchange import __version__
from exchange.errors import BadRequest, Forbidden, MethodNotAllowed, UnsupportedMediaType
from exchange.fhir import resources
from exchange.fhir.capability import capability_statement
from exchange.fhir.store import Stored
from exchange.hub.deps import CurrentPrincipal, Services, subject_of
from exchange.policy import decisions
from exchange.security.scopes import require
from exchange.security.tokens import Principal
from exchange.web.errors import FHIR_JSON

router = APIRouter(prefix="/fhir", tags=["fhir"])


def _served(resource_type: str) -> str:
    return resources.served_type(resource_type)


def _writable(resource_type: str) -> str:
    resources.served_type(resource_type)
    if not resources.SERVED[resource_type]:
        raise MethodNotAllowed(f"{resource_type} is written by the hub only; it is read-only here")
    return resource_type


# Declared before the principal, so an unknown type is 404 whoever asks.
ServedType = Annotated[str, Depends(_served)]
WritableType = Annotated[str, Depends(_writable)]

_JSON_TYPES = ("application/fhir+json", "application/json")


def _fhir(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(json.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def _resource_response(stored: Stored, status: int, base: str) -> Response:
    location = f"{base}/fhir/{stored.resource_type}/{stored.id}/_history/{stored.version}"
    return _fhir(
        stored.body,
        status,
        {
            "ETag": stored.etag,
            "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
            "Location": location,
        },
    )


_INTERACTIONS = {"c": "create", "r": "read", "u": "update"}


async def _authorize(
    services: Services, principal: Principal, resource_type: str, interaction: str
) -> None:
    """Scopes first (what the token allows), then the HIE's policy (what the person may do)."""
    require(principal.scopes, resource_type, interaction)
    decision = await anyio.to_thread.run_sync(
        decisions.fhir_interaction,
        services.policy,
        subject_of(principal),
        _INTERACTIONS[interaction],
        resource_type,
    )
    if not decision.allow:
        raise Forbidden(decision.reason())


async def _resource_body(request: Request, resource_type: str) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES:
        raise UnsupportedMediaType("send FHIR resources as application/fhir+json")
    data = resources.parse_json(await request.body())
    return resources.to_json(resources.validate(resource_type, data))


@router.get("/metadata")
async def metadata(services: Services) -> Response:
    return _fhir(capability_statement(services.settings.base_url(), __version__))


@router.post("/{resource_type}")
async def create(
    resource_type: WritableType, request: Request, services: Services, principal: CurrentPrincipal
) -> Response:
    await _authorize(services, principal, resource_type, "c")
    body = await _resource_body(request, resource_type)
    body.pop("id", None)
    stored = await anyio.to_thread.run_sync(services.resources.create, resource_type, body)
    return _resource_response(stored, 201, services.settings.base_url())


@router.get("/{resource_type}/{rid}")
async def read(
    resource_type: ServedType, rid: str, services: Services, principal: CurrentPrincipal
) -> Response:
    await _authorize(services, principal, resource_type, "r")
    stored = await anyio.to_thread.run_sync(services.resources.read, resource_type, rid)
    return _resource_response(stored, 200, services.settings.base_url())


@router.get("/{resource_type}/{rid}/_history/{version}")
async def vread(
    resource_type: ServedType,
    rid: str,
    version: int,
    services: Services,
    principal: CurrentPrincipal,
) -> Response:
    await _authorize(services, principal, resource_type, "r")
    stored = await anyio.to_thread.run_sync(services.resources.vread, resource_type, rid, version)
    return _resource_response(stored, 200, services.settings.base_url())


@router.put("/{resource_type}/{rid}")
async def update(
    resource_type: WritableType,
    rid: str,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    await _authorize(services, principal, resource_type, "u")
    body = await _resource_body(request, resource_type)
    if body.get("id") not in (None, rid):
        raise BadRequest(f"the body's id {body.get('id')!r} does not match the URL ({rid})")
    stored, created = await anyio.to_thread.run_sync(
        services.resources.update, resource_type, rid, body, if_match
    )
    return _resource_response(stored, 201 if created else 200, services.settings.base_url())
