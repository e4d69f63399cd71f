"""Operator API of the master patient index: review probable matches, link, unlink."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import BaseModel, Field

from exchange.errors import Forbidden
from exchange.hub.deps import CurrentPrincipal, Services
from exchange.security.tokens import Principal

router = APIRouter(prefix="/admin/mpi", tags=["master patient index"])


class Pair(BaseModel):
    """Two Patient ids (``abc`` or ``Patient/abc``)."""

    patients: list[str] = Field(min_length=2, max_length=2)

    def ids(self) -> tuple[str, str]:
        first, second = (p.removeprefix("Patient/") for p in self.patients)
        return first, second


def _operator(principal: Principal) -> None:
    if principal.role != "operator":
        raise Forbidden("only HIE operators may review or change patient links")


@router.get("/review")
async def review(
    services: Services, principal: CurrentPrincipal, status: str = "pending"
) -> dict[str, Any]:
    _operator(principal)
    items = await anyio.to_thread.run_sync(services.patients.review, status)
    return {
        "status": status,
        "items": [
            {
                "patients": [f"Patient/{i.first}", f"Patient/{i.second}"],
                "reason": i.reason,
                "created": i.created_at.isoformat(),
            }
            for i in items
        ],
    }


@router.post("/link")
async def link(pair: Pair, services: Services, principal: CurrentPrincipal) -> dict[str, str]:
    _operator(principal)
    await anyio.to_thread.run_sync(services.patients.link, *pair.ids())
    services.facts.clear()
    return {"result": "linked"}


@router.post("/unlink")
async def unlink(pair: Pair, services: Services, principal: CurrentPrincipal) -> dict[str, str]:
    _operator(principal)
    await anyio.to_thread.run_sync(services.patients.unlink, *pair.ids())
    services.facts.clear()
    return {"result": "unlinked"}
