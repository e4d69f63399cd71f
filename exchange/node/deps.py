"""Typed dependencies for node routes: who is asking, and for which tenant."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Depends, Header, Request

from exchange.errors import NotAuthenticated, NotFound, Unavailable
from exchange.node.services import NodeServices
from exchange.security.grants import Action, Grant
from exchange.security.tokens import bearer_token
from exchange.web.peer import require_hub_certificate


def _services(request: Request) -> NodeServices:
    services: NodeServices = request.app.state.services
    return services


Services = Annotated[NodeServices, Depends(_services)]


async def _site_tenant(
    services: Services,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> str:
    return await anyio.to_thread.run_sync(services.credentials.tenant_for, authorization, x_api_key)


#: The tenant a site credential (API key or site-system token) is bound to.
SiteTenant = Annotated[str, Depends(_site_tenant)]


@dataclass(frozen=True)
class StudyAccess:
    """A verified hub grant and the tenant that holds its study."""

    tenant: str
    grant: Grant


async def authorize_study(
    services: NodeServices,
    authorization: str | None,
    study: str,
    action: Action,
    scope: Mapping[str, Any],
) -> StudyAccess:
    """Check the hub grant for ``study``/``action`` and find the tenant holding the study.

    ``scope`` is the request's ASGI scope: with mutual TLS configured, a grant counts
    only over a connection that presented the hub's client certificate.
    """
    if services.grants is None:
        raise Unavailable("this node has no hub configured (EXCHANGE_HUB_URL); it serves no images")
    settings = services.settings
    require_hub_certificate(scope, settings.tls_client_ca_file, settings.tls_client_names)
    token = bearer_token(authorization)
    grant = await anyio.to_thread.run_sync(services.grants.verify, token, study, action)
    candidates = [
        t
        for t, cfg in settings.tenants.items()
        if grant.organization is None or cfg.organization == grant.organization
    ]
    holding = await anyio.to_thread.run_sync(services.store.tenants_holding, study, candidates)
    if len(holding) != 1:
        raise (
            NotFound("this node holds no such study")
            if not holding
            else NotAuthenticated("the grant must name the holding organisation for this study")
        )
    return StudyAccess(holding[0], grant)


def _grant(action: Action) -> Callable[..., Awaitable[StudyAccess]]:
    async def dependency(
        request: Request,
        study: str,
        services: Services,
        authorization: Annotated[str | None, Header()] = None,
    ) -> StudyAccess:
        return await authorize_study(services, authorization, study, action, request.scope)

    return dependency


#: A grant to view ``{study}`` (metadata, frames, rendered).
ViewAccess = Annotated[StudyAccess, Depends(_grant("view"))]
#: A grant to export ``{study}`` (raw DICOM instances).
ExportAccess = Annotated[StudyAccess, Depends(_grant("export"))]
