"""Patient access codes at ``{hub}/exchange/access-codes`` (issue 8).

- ``POST /exchange/access-codes``: the holding site's staff issue a code after
  verifying the patient's identity (201; the code is in this answer only).
- ``POST /exchange/access-codes/redeem``: the patient exchanges the code for a
  short patient session (no token needed; limited per code and per address).
- ``POST /exchange/access-codes/{id}/revoke``: the issuing organisation's staff,
  the patient or an HIE operator withdraw a code.
- ``GET /exchange/access-codes?patient=<id>``: a patient's codes, never the codes
  themselves.

Thin routes: bodies are checked here (400), everything else is
``exchange.hub.accesscodes``, run in a worker thread. Errors are JSON
``{"error": …}``; answers carrying a code or a token are never cached.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from exchange.hub import accesscodes
from exchange.hub.deps import CurrentPrincipal, Services

router = APIRouter(prefix="/exchange/access-codes", tags=["patient access"])

#: A code or a session token must not be kept by any cache on the way (RFC 6749 §5.1).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class Verification(BaseModel):
    """How the holding site verified who the patient is (the verifier is the caller)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(min_length=1, max_length=64)
    verified_at: AwareDatetime
    note: str | None = Field(default=None, max_length=500)


class IssueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient: str = Field(max_length=80)
    studies: list[str] = Field(min_length=1, max_length=accesscodes.MAX_STUDIES)
    verification: Verification
    expires_in_days: float | None = None
    #: Re-issue: the code this one replaces (revoked in the same transaction).
    replaces: str | None = Field(default=None, max_length=40)


class RedeemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(max_length=100)


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


@router.post("", status_code=201, summary="Issue a patient access code")
async def issue(
    body: IssueRequest, request: Request, services: Services, principal: CurrentPrincipal
) -> JSONResponse:
    issued = await anyio.to_thread.run_sync(
        partial(
            accesscodes.issue_for,
            services,
            principal,
            patient=body.patient,
            studies=body.studies,
            method=body.verification.method,
            verified_at=body.verification.verified_at,
            note=body.verification.note,
            expires_in_days=body.expires_in_days,
            replaces=body.replaces,
            address=_address(request),
        )
    )
    return JSONResponse(issued.as_json(), status_code=201, headers=NO_STORE)


@router.post("/redeem", summary="Redeem a patient access code for a patient session")
async def redeem(body: RedeemRequest, request: Request, services: Services) -> JSONResponse:
    session = await anyio.to_thread.run_sync(
        accesscodes.redeem_for, services, body.code, _address(request)
    )
    return JSONResponse(session.as_json(), headers=NO_STORE)


@router.post("/{code_id}/revoke", summary="Revoke a patient access code")
async def revoke(
    code_id: str,
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
) -> JSONResponse:
    revoked = await anyio.to_thread.run_sync(
        accesscodes.revoke_for, services, principal, code_id, _address(request)
    )
    return JSONResponse(revoked.as_json(services.access_codes.now_ms()))


@router.get("", summary="A patient's access codes (never the codes themselves)")
async def list_codes(
    request: Request,
    services: Services,
    principal: CurrentPrincipal,
    patient: Annotated[str, Query(max_length=80)],
) -> JSONResponse:
    found = await anyio.to_thread.run_sync(
        accesscodes.list_for, services, principal, patient, _address(request)
    )
    now = services.access_codes.now_ms()
    return JSONResponse({"codes": [code.as_json(now) for code in found]})
