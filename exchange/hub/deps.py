"""Typed dependencies for hub routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from exchange.hub.services import HubServices
from exchange.policy.decisions import Subject
from exchange.security.tokens import Principal, bearer_token


def _services(request: Request) -> HubServices:
    services: HubServices = request.app.state.services
    return services


Services = Annotated[HubServices, Depends(_services)]


def _principal(
    services: Services, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    # A plain function: FastAPI runs it in a worker thread, so a JWKS fetch never blocks the loop.
    return services.tokens.validate(bearer_token(authorization))


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def subject_of(principal: Principal) -> Subject:
    return Subject(
        id=principal.sub,
        role=principal.role,
        organization=principal.organization,
        purpose_of_use=principal.purpose_of_use,
        patient=principal.patient,
    )
