"""Deleting a study at the node (``DELETE /dicomweb/studies/{study}``) retracts it.

The site's credential removes the study's instances from its tenant; the same
transaction queues the study's retraction from the hub's index, which the
publishing worker carries out (see ``exchange.node.publisher``).
"""

from __future__ import annotations

import logging
import re

import anyio
from fastapi import APIRouter
from starlette.responses import JSONResponse, Response

from exchange.errors import BadRequest, NotFound
from exchange.node.deps import Services, SiteTenant
from exchange.web import openapi

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], default_response_class=Response)
log = logging.getLogger(__name__)

_UID = re.compile(r"[0-9][0-9.]{0,63}")


@router.delete(
    "/studies/{study}",
    summary="Delete a study and retract it from the hub",
    responses=openapi.dicomweb_ok("/studies/{study}", "delete"),
)
async def delete_study(study: str, services: Services, tenant: SiteTenant) -> JSONResponse:
    if not _UID.fullmatch(study):
        raise BadRequest("the study in the URL is not a valid Study Instance UID")
    removed = await anyio.to_thread.run_sync(services.store.delete_study, tenant, study)
    if not removed:
        raise NotFound("this tenant holds no such study")
    log.info("study deleted", extra={"tenant": tenant, "instances": removed})
    hub = "retraction queued" if services.publisher is not None else "no hub publishing configured"
    return JSONResponse({"deleted_instances": removed, "hub": hub})
