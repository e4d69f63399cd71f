"""DICOMweb QIDO-RS on the node (PS3.18 §10.6); matching lives in ``exchange.node.query``.

Within a study (``/studies/{study}/…``) a hub ``view`` grant for that study is
required. The study search ``/studies`` has no study in its path, so it takes
either a site credential (the site's own systems, over their own tenant) or a
hub grant, and then only to look up the granted study by its UID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
import jwt
from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import JSONResponse, Response

from exchange.errors import BadRequest, Forbidden, NotAuthenticated
from exchange.node import query
from exchange.node.deps import Services, ViewAccess, authorize_study
from exchange.node.routes.wado import DICOM_JSON, check_json_acceptable
from exchange.security.grants import GRANT_TYPE
from exchange.web import openapi

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], default_response_class=Response)


@dataclass(frozen=True)
class SearchScope:
    """The tenant a study search covers and, for a grant holder, the one study it may find."""

    tenant: str
    study: str | None


def _grant_claims(authorization: str | None) -> dict[str, object] | None:
    """The unverified claims of a hub grant, or None when the bearer is something else."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        if jwt.get_unverified_header(token.strip()).get("typ") != GRANT_TYPE:
            return None
        claims: dict[str, object] = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims


async def _study_search_scope(
    request: Request,
    services: Services,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> SearchScope:
    """A site credential searches its tenant; a hub grant finds only its own study."""
    if not authorization and not x_api_key:
        raise NotAuthenticated(
            "a site credential (API key or site-system token) or a hub grant is required",
            error="invalid_request",
        )
    claims = None if x_api_key else _grant_claims(authorization)
    if claims is None:
        tenant = await anyio.to_thread.run_sync(
            services.credentials.tenant_for, authorization, x_api_key
        )
        return SearchScope(tenant, None)
    # Verified in full (signature, issuer, audience, expiry) for the study it names.
    access = await authorize_study(
        services, authorization, str(claims.get("study")), "view", request.scope
    )
    asked = query.study_uids(list(request.query_params.multi_items()))
    if not asked:
        raise BadRequest(
            "with a hub grant, search for the granted study: give StudyInstanceUID=<its UID>"
        )
    if set(asked) != {access.grant.study}:
        raise Forbidden("the grant is for another study")
    return SearchScope(access.tenant, access.grant.study)


StudySearchScope = Annotated[SearchScope, Depends(_study_search_scope)]


async def _search(
    request: Request,
    services: Services,
    level: query.Level,
    scope: query.Scope,
    accept: str | None,
) -> Response:
    check_json_acceptable(accept, "a search result")
    search = query.parse(level, list(request.query_params.multi_items()))
    runner = query.CatalogSearch(services.engine, services.store, services.settings.base_url())
    page = await anyio.to_thread.run_sync(runner.run, search, scope)
    headers = {}
    if page.more:
        headers["Warning"] = (
            f'299 {services.settings.base_url()} "There are additional results that can be '
            'requested"'
        )
    return JSONResponse(page.results, media_type=DICOM_JSON, headers=headers)


Accept = Annotated[str | None, Header()]


@router.get(
    "/studies",
    summary="Search for studies",
    responses=openapi.dicomweb_ok("/studies", "get"),
)
async def search_studies(
    request: Request, scope: StudySearchScope, services: Services, accept: Accept = None
) -> Response:
    return await _search(
        request, services, query.Level.STUDY, query.Scope(scope.tenant, scope.study), accept
    )


@router.get(
    "/studies/{study}/series",
    summary="Search for a study's series",
    responses=openapi.dicomweb_ok("/studies/{study}/series", "get"),
)
async def search_series(
    request: Request, study: str, access: ViewAccess, services: Services, accept: Accept = None
) -> Response:
    return await _search(
        request, services, query.Level.SERIES, query.Scope(access.tenant, study), accept
    )


@router.get(
    "/studies/{study}/instances",
    summary="Search for a study's instances",
    responses=openapi.dicomweb_ok("/studies/{study}/instances", "get"),
)
async def search_study_instances(
    request: Request, study: str, access: ViewAccess, services: Services, accept: Accept = None
) -> Response:
    return await _search(
        request, services, query.Level.INSTANCE, query.Scope(access.tenant, study), accept
    )


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="Search for a series' instances",
    responses=openapi.dicomweb_ok("/studies/{study}/series/{series}/instances", "get"),
)
async def search_series_instances(
    request: Request,
    study: str,
    series: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    return await _search(
        request,
        services,
        query.Level.INSTANCE,
        query.Scope(access.tenant, study, series),
        accept,
    )
