"""Typed dependencies for hub routes."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import Depends, Header, Request

from exchange.audit.events import What
from exchange.errors import ExchangeError, NotAuthenticated
from exchange.hub import auditing
from exchange.hub.services import HubServices
from exchange.security.tokens import Principal, bearer_token


async def _services(request: Request) -> HubServices:
    # async: a trivial lookup must not cost a worker-thread round trip per request
    services: HubServices = request.app.state.services
    return services


Services = Annotated[HubServices, Depends(_services)]

log = logging.getLogger(__name__)


async def _principal(
    services: Services, request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The validated caller. A token seen before is answered from the cache until it
    expires; a new one is validated in a worker thread (a JWKS fetch never blocks the loop)."""
    if authorization is not None:
        known = services.principals.get(authorization)
        if known is not None:
            return known
    try:
        principal = await anyio.to_thread.run_sync(
            services.tokens.validate, bearer_token(authorization)
        )
    except NotAuthenticated as refused:
        if authorization is not None:  # a token was offered and refused: a failed login
            await anyio.to_thread.run_sync(_audit_login_failure, services, request, refused.message)
        raise
    assert authorization is not None  # bearer_token refused a missing header
    services.principals.put(authorization, principal)
    return principal


def _audit_login_failure(services: HubServices, request: Request, reason: str) -> None:
    """Recorded if at all possible; the caller gets its 401 either way (nothing is released)."""
    address = request.client.host if request.client else None
    what = What(query=None, resource=request.url.path)
    try:
        auditing.record(
            services,
            action="login-failure",
            principal=None,
            address=address,
            what=what,
            decision=None,
            allowed=False,
            reason=reason,
        )
    except ExchangeError:
        log.warning("a failed login could not be audited")


CurrentPrincipal = Annotated[Principal, Depends(_principal)]
