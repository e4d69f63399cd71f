"""Keys others need to check what the hub signs.

The development IdP's own discovery and keys are in ``routes/idp.py``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from exchange.hub.deps import Services

router = APIRouter(tags=["keys"])


@router.get("/.well-known/jwks.json")
async def grant_jwks(services: Services) -> dict[str, Any]:
    """The key nodes use to verify the hub's grants."""
    return services.grant_key.jwks()
