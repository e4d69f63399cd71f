"""FHIR R4 REST at ``/fhir``: thin routes over the repository and the search pipeline.

Every route checks the token's scopes and the type-level policy first; every
resource read or found then passes ``access`` (the per-resource hook) in the
worker thread that loaded it, so a later policy call there never blocks the
event loop.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from email.utils import format_datetime
from functools import cache, partial
from typing import Annotated, Any
from urllib.parse import parse_qsl

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from exchange import __version__
from exchange.audit.events import AuditAction, Interaction, What
from exchange.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, UnsupportedMediaType
from exchange.fhir import bundle, resources, search
from exchange.fhir.capability import capability_statement
from exchange.fhir.repository import History, Stored, Written
from exchange.hub import access, auditing, publishing
from exchange.hub.access import subject_of
from exchange.hub.deps import CurrentPrincipal, Services
from exchange.hub.services import HubServices
from exchange.policy import decisions
from exchange.security.scopes import permits, require
from exchange.security.tokens import Principal
from exchange.web import openapi
from exchange.web.errors import FHIR_JSON

# Every answer is a FHIR resource as application/fhir+json (web/openapi.py adds the errors).
router = APIRouter(
    prefix="/fhir",
    tags=["fhir"],
    default_response_class=Response,
    responses=openapi.fhir_ok(200),
)

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_JSON_TYPES = ("application/fhir+json", "application/json")
_FORM = "application/x-www-form-urlencoded"
#: The largest OFFSET SQL takes (a signed 64-bit integer).
_MAX_OFFSET = 2**63 - 1
#: SMART interaction letter -> the interaction the type-level policy is asked about
#: (a search or a history read is a read to the policy).
_POLICY_INTERACTIONS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "read"}

_RESOURCE_BODY = {
    "requestBody": {
        "required": True,
        "content": openapi.content(FHIR_JSON, openapi.RESOURCE_SCHEMA),
    }
}
_FORM_BODY = {
    "requestBody": {"content": openapi.content(_FORM, {"type": "object"})},
}


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


def _fhir(
    body: dict[str, Any] | None, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    media = FHIR_JSON if body is not None else None
    return Response(content, status_code=status, media_type=media, headers=headers)


def _fhir_base(services: HubServices) -> str:
    return f"{services.settings.base_url()}/fhir"


def _version_headers(stored: Stored, base: str) -> dict[str, str]:
    return {
        "ETag": stored.etag,
        "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
        "Location": f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version}",
    }


def _prefer(request: Request) -> dict[str, str]:
    """``Prefer: return=minimal, handling=lenient`` as a dict."""
    found: dict[str, str] = {}
    for header in request.headers.getlist("prefer"):
        for part in header.split(","):
            key, _, value = part.strip().partition("=")
            found[key.strip().lower()] = value.strip().strip('"')
    return found


def _check_id(resource_type: str, rid: str) -> str:
    if rid == "_history":
        raise NotFound(f"history of all {resource_type} resources is not supported; ask per id")
    if not _ID.match(rid):
        raise NotFound(f"{rid!r} is not a FHIR id, so no {resource_type} has it")
    return rid


def _may_include(principal: Principal, services: HubServices, resource_type: str) -> bool:
    """Whether resources of ``resource_type`` may be ``_include``d for ``principal``: the
    same scope and type-level policy checks as a read of that type."""
    if not (
        permits(principal.scopes, resource_type, "r")
        or permits(principal.scopes, resource_type, "s")
    ):
        return False
    decision = decisions.fhir_interaction(
        services.policy, subject_of(principal), "read", resource_type
    )
    return decision.allow


def _audit_action(resource_type: str, letter: str) -> AuditAction:
    if letter in ("s", "r"):
        return "search" if letter == "s" else "read"
    if resource_type == "Consent":
        return "consent-change"
    return "retract" if letter == "d" else "publish"


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


def _break_glass_reason(request: Request) -> str | None:
    return request.headers.get(auditing.BREAK_GLASS_HEADER)


def _audit_now(
    services: HubServices,
    request: Request,
    principal: Principal,
    action: AuditAction,
    what: What,
    *,
    allowed: bool,
    decision: decisions.Decision | None = None,
    reason: str | None = None,
    interaction: Interaction | None = None,
) -> None:
    """Durable before the answer goes out; ``Unavailable`` (503) when it cannot be.
    Runs in the worker thread that did the request's other work."""
    auditing.record(
        services,
        action=action,
        principal=principal,
        address=_address(request),
        what=what,
        decision=decision,
        allowed=allowed,
        reason=reason,
        break_glass_reason=_break_glass_reason(request),
        interaction=interaction,
    )


def _authorize_now(
    services: HubServices,
    principal: Principal,
    resource_type: str,
    letter: str,
    request: Request,
) -> None:
    """Scopes first (what the token allows), then the HIE's policy (what the person may do).
    A refusal is audited before it is answered. Runs in a worker thread."""
    try:
        require(principal.scopes, resource_type, letter)
        decision = decisions.fhir_interaction(
            services.policy,
            subject_of(principal),
            _POLICY_INTERACTIONS[letter],
            resource_type,
        )
        if not decision.allow:
            raise Forbidden(decision.reason())
    except Forbidden as refused:
        shown = What(query=str(request.url.query) or None, resource=resource_type)
        _audit_now(
            services,
            request,
            principal,
            _audit_action(resource_type, letter),
            shown,
            allowed=False,
            reason=refused.message,
        )
        raise


async def _authorize(
    services: HubServices,
    principal: Principal,
    resource_type: str,
    letter: str,
    request: Request,
) -> None:
    await anyio.to_thread.run_sync(
        _authorize_now, services, principal, resource_type, letter, request
    )


async def _resource_body(request: Request, resource_type: str) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES:
        raise UnsupportedMediaType("send FHIR resources as application/fhir+json")
    data = resources.parse_json(await request.body())
    return resources.to_json(resources.validate(resource_type, data))


def _written_response(written: Written, request: Request, base: str) -> Response:
    stored = written.stored
    status = 201 if written.outcome == "created" else 200
    headers = _version_headers(stored, base)
    wanted = _prefer(request).get("return", "representation")
    if wanted == "minimal":
        return _fhir(None, status, headers)
    if wanted.lower() == "operationoutcome":
        what = {
            "created": "created",
            "updated": "updated",
            "unchanged": "unchanged: the content is the same as the current version",
            "existing": "not created: it already exists (If-None-Exist)",
        }.get(written.outcome, written.outcome)
        message = f"{stored.resource_type}/{stored.id} version {stored.version} {what}"
        return _fhir(bundle.outcome([message], "information"), status, headers)
    return _fhir(stored.body, status, headers)


def _after_write(services: HubServices, written: Written) -> Written:
    """A new or changed Patient is matched against the master patient index; a changed
    Endpoint or Patient is seen by the next decision at once."""
    stored = written.stored
    if stored.resource_type in ("Endpoint", "Patient"):
        services.facts.clear()
    if stored.resource_type == "Patient" and written.outcome in ("created", "updated"):
        services.patients.reconcile(stored.id)
        stored = services.resources.read("Patient", stored.id)  # links may have been added
        return Written(stored, written.outcome)
    return written


def _conditions(
    resource_type: str, items: Sequence[tuple[str, str]], base: str
) -> search.SearchQuery:
    return search.parse(resource_type, items, local_base=base)


# -- routes --------------------------------------------------------------------


@router.get("/metadata")
async def metadata(services: Services) -> Response:
    idp = services.idp
    oauth = (
        {"authorize": f"{idp.issuer}/authorize", "token": f"{idp.issuer}/token"} if idp else None
    )
    return _fhir(capability_statement(services.settings.base_url(), __version__, oauth))


@router.get("/{resource_type}")
async def search_get(
    resource_type: ServedType, request: Request, services: Services, principal: CurrentPrincipal
) -> Response:
    items = list(request.query_params.multi_items())
    return await _search(resource_type, items, request, services, principal)


@router.post("/{resource_type}/_search", openapi_extra=_FORM_BODY)
async def search_post(
    resource_type: ServedType, request: Request, services: Services, principal: CurrentPrincipal
) -> Response:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if body and content_type != _FORM:
        raise UnsupportedMediaType(f"send search parameters as {_FORM}")
    try:
        form = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("the search form is not valid UTF-8") from None
    items = list(request.query_params.multi_items()) + form
    return await _search(resource_type, items, request, services, principal)


async def _search(
    resource_type: str,
    items: list[tuple[str, str]],
    request: Request,
    services: HubServices,
    principal: Principal,
) -> Response:
    """Authorize, expand linked patients, search under the policy, present and audit: all
    in one worker thread (each hop to a thread costs more than most of these steps)."""
    query_text = "&".join(f"{k}={v}" for k, v in items) or None
    base = _fhir_base(services)
    lenient = _prefer(request).get("handling") == "lenient"
    reason = _break_glass_reason(request)

    @cache
    def may_read_type(included_type: str) -> bool:
        return _may_include(principal, services, included_type)

    def work() -> tuple[search.SearchResult, dict[str, Any]]:
        _authorize_now(services, principal, resource_type, "s", request)
        query = search.parse(resource_type, items, lenient=lenient, local_base=base)
        query = services.patients.expand(query)
        visible: Callable[[Sequence[Any]], list[Any]] = partial(
            access.filter_visible, services, principal, action="search", reason=reason
        )
        result = search.execute(
            services.resources, query, visible=visible, may_read_type=may_read_type
        )
        result = dataclasses.replace(
            result,
            matches=_presented(services, principal, result.matches),
            included=_presented(services, principal, result.included),
        )
        shown = [*result.matches, *result.included]
        what = What(patients=auditing.patients_of(shown), query=query_text, resource=resource_type)
        _audit_now(services, request, principal, "search", what, allowed=True)
        return result, bundle.searchset(result, base)

    result, body = await anyio.to_thread.run_sync(work)
    return _fhir(body, headers={"Server-Timing": f"search;dur={result.elapsed_ms:.2f}"})


def _presented(services: HubServices, principal: Principal, found: list[Stored]) -> list[Stored]:
    """Resources as callers see them: DICOMweb Endpoints point at the hub's broker. HIE
    operators, who register the sites, see the sites' own addresses."""
    if principal.role == "operator":
        return found
    broker = f"{services.settings.base_url()}/dicomweb"
    return [
        dataclasses.replace(s, body=access.broker_view(s.body, broker))
        if s.resource_type == "Endpoint"
        else s
        for s in found
    ]


def _what(stored: Stored | access.Visible, services: HubServices | None = None) -> What:
    if stored.resource_type == "ImagingStudy":
        return auditing.study_what(stored, services=services)
    return What(
        patients=auditing.patients_of([stored]),
        resource=f"{stored.resource_type}/{stored.id}",
    )


async def _read_checked(
    services: HubServices,
    request: Request,
    principal: Principal,
    resource_type: str,
    load: Callable[[], Any],
    current: Callable[[Any], Stored | access.Visible],
) -> Any:
    """Authorize, load, decide and audit one direct read (read, vread, history) in one
    worker thread: 403 with the policy's reason, audited, when the caller may not have it."""
    reason = _break_glass_reason(request)

    def checked() -> Any:
        _authorize_now(services, principal, resource_type, "r", request)
        found = load()
        item = current(found)
        what = _what(item, services)
        try:
            decision = access.require_visible(services, principal, item, "read", reason)
        except Forbidden as refused:
            _audit_now(
                services, request, principal, "read", what, allowed=False, reason=refused.message
            )
            raise
        _audit_now(services, request, principal, "read", what, allowed=True, decision=decision)
        return found

    return await anyio.to_thread.run_sync(checked)


async def _audit_write(
    services: HubServices,
    request: Request,
    principal: Principal,
    letter: str,
    written: Written,
) -> None:
    stored = written.stored
    if written.outcome in ("unchanged", "existing", "gone"):
        return  # nothing changed: the interaction left no trace to account for
    what = _what(stored)
    action = _audit_action(stored.resource_type, letter)
    did: Interaction = (
        "delete" if letter == "d" else "create" if written.outcome == "created" else "update"
    )
    await anyio.to_thread.run_sync(
        lambda: _audit_now(
            services, request, principal, action, what, allowed=True, interaction=did
        )
    )


@router.post("/{resource_type}", responses=openapi.fhir_ok(200, 201), openapi_extra=_RESOURCE_BODY)
async def create(
    resource_type: WritableType,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
    if_none_exist: Annotated[str | None, Header()] = None,
) -> Response:
    """Create; conditional when ``If-None-Exist`` (or, as some clients send it, the query
    string) carries search conditions."""
    await _authorize(services, principal, resource_type, "c", request)
    base = _fhir_base(services)
    body = await _resource_body(request, resource_type)
    body.pop("id", None)
    raw = if_none_exist if if_none_exist is not None else request.url.query
    conditions = _conditions(resource_type, parse_qsl(raw, keep_blank_values=True), base)

    hook = publishing.write_hook(services.resources, principal, resource_type)

    def write() -> Written:
        written = services.resources.create(
            resource_type, body, conditions if conditions.criteria else None, hook
        )
        if written.outcome == "existing":
            access.require_visible(services, principal, written.stored)
        return _after_write(services, written)

    written = await anyio.to_thread.run_sync(write)
    await _audit_write(services, request, principal, "c", written)
    return _written_response(written, request, base)


@router.put("/{resource_type}", responses=openapi.fhir_ok(200, 201), openapi_extra=_RESOURCE_BODY)
async def conditional_update(
    resource_type: WritableType, request: Request, services: Services, principal: CurrentPrincipal
) -> Response:
    """``PUT Type?conditions``: create if nothing matches, update the one match, 412 if
    several match. Publishing the same content again creates no new version."""
    await _authorize(services, principal, resource_type, "u", request)
    base = _fhir_base(services)
    conditions = _conditions(resource_type, list(request.query_params.multi_items()), base)
    if not conditions.criteria:
        raise BadRequest("PUT needs an id in the URL or search conditions in the query")
    body = await _resource_body(request, resource_type)
    hook = publishing.write_hook(services.resources, principal, resource_type)

    def write() -> Written:
        written = services.resources.conditional_update(resource_type, conditions, body, hook)
        return _after_write(services, written)

    written = await anyio.to_thread.run_sync(write)
    await _audit_write(services, request, principal, "u", written)
    return _written_response(written, request, base)


@router.get("/{resource_type}/{rid}", responses={304: {"description": "Not Modified"}})
async def read(
    resource_type: ServedType,
    rid: str,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    _check_id(resource_type, rid)
    stored: Stored = await _read_checked(
        services,
        request,
        principal,
        resource_type,
        lambda: services.resources.read(resource_type, rid),
        lambda found: found,
    )
    stored = _presented(services, principal, [stored])[0]
    headers = _version_headers(stored, _fhir_base(services))
    if if_none_match is not None and if_none_match.strip().removeprefix("W/").strip('"') == str(
        stored.version
    ):
        return _fhir(None, 304, headers)
    return _fhir(stored.body, 200, headers)


@router.put(
    "/{resource_type}/{rid}", responses=openapi.fhir_ok(200, 201), openapi_extra=_RESOURCE_BODY
)
async def update(
    resource_type: WritableType,
    rid: str,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    _check_id(resource_type, rid)
    await _authorize(services, principal, resource_type, "u", request)
    body = await _resource_body(request, resource_type)
    if body.get("id") not in (None, rid):
        raise BadRequest(f"the body's id {body.get('id')!r} does not match the URL ({rid})")
    hook = publishing.write_hook(services.resources, principal, resource_type)

    def write() -> Written:
        written = services.resources.update(resource_type, rid, body, if_match, hook)
        return _after_write(services, written)

    written = await anyio.to_thread.run_sync(write)
    await _audit_write(services, request, principal, "u", written)
    return _written_response(written, request, _fhir_base(services))


@router.delete("/{resource_type}/{rid}")
async def delete(
    resource_type: WritableType,
    rid: str,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Delete: a new, deleted version (history keeps the old ones); reads then answer 410."""
    _check_id(resource_type, rid)
    await _authorize(services, principal, resource_type, "d", request)
    hook = publishing.write_hook(services.resources, principal, resource_type)
    written = await anyio.to_thread.run_sync(
        services.resources.delete, resource_type, rid, if_match, hook
    )
    if resource_type in ("Endpoint", "Patient"):
        services.facts.clear()
    await _audit_write(services, request, principal, "d", written)
    stored = written.stored
    if written.outcome == "gone":
        message = f"{resource_type}/{rid} was already deleted"
    else:
        message = f"{resource_type}/{rid} deleted (version {stored.version})"
    return _fhir(
        bundle.outcome([message], "information"),
        200,
        {"ETag": stored.etag, "Last-Modified": format_datetime(stored.last_updated, usegmt=True)},
    )


@router.get("/{resource_type}/{rid}/_history")
async def history(
    resource_type: ServedType,
    rid: str,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
) -> Response:
    _check_id(resource_type, rid)
    await _authorize(services, principal, resource_type, "r", request)
    count, offset = search.DEFAULT_COUNT, 0
    for key, value in request.query_params.multi_items():
        try:
            if key == "_count":
                count = min(search.MAX_COUNT, max(1, int(value)))
            elif key == "_offset":  # beyond a 64-bit SQL integer there is nothing anyway
                offset = min(max(0, int(value)), _MAX_OFFSET)
            elif key not in ("_format", "_pretty"):
                raise BadRequest(f"history parameter {key!r} is not supported (use _count)")
        except ValueError:
            raise BadRequest(f"{key} must be a whole number") from None

    found: History = await _read_checked(
        services,
        request,
        principal,
        resource_type,
        lambda: services.resources.history(resource_type, rid, offset, count),
        lambda loaded: loaded.current,
    )
    if principal.role != "operator" and resource_type == "Endpoint":
        broker = f"{services.settings.base_url()}/dicomweb"
        versions = [
            dataclasses.replace(v, body=access.broker_view(v.body, broker) if v.body else None)
            for v in found.versions
        ]
        found = dataclasses.replace(found, versions=versions)
    return _fhir(bundle.history(found, _fhir_base(services), offset, count))


@router.get("/{resource_type}/{rid}/_history/{version}")
async def vread(
    resource_type: ServedType,
    rid: str,
    version: int,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
) -> Response:
    _check_id(resource_type, rid)
    stored: Stored = await _read_checked(
        services,
        request,
        principal,
        resource_type,
        lambda: services.resources.vread(resource_type, rid, version),
        lambda found: found,
    )
    stored = _presented(services, principal, [stored])[0]
    return _fhir(stored.body, 200, _version_headers(stored, _fhir_base(services)))
