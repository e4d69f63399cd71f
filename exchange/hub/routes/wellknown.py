"""Keys others need to check what the hub signs, and the development IdP when on."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from exchange.errors import NotFound
from exchange.hub.deps import Services

router = APIRouter(tags=["keys"])


@router.get("/.well-known/jwks.json")
async def grant_jwks(services: Services) -> dict[str, Any]:
    """The key nodes use to verify the hub's grants."""
    return services.grant_key.jwks()


def _idp(services: Services) -> Any:
    if services.idp is None:
        raise NotFound("the development identity provider is not enabled")
    return services.idp


@router.get("/idp/.well-known/openid-configuration")
async def idp_discovery(services: Services) -> dict[str, Any]:
    return _idp(services).discovery()  # type: ignore[no-any-return]


@router.get("/idp/.well-known/jwks.json")
async def idp_jwks(services: Services) -> dict[str, Any]:
    return _idp(services).key.jwks()  # type: ignore[no-any-return]
