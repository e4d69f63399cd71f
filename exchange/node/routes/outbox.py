"""``GET /admin/outbox``: what the site's tenant still has to publish, for its operators.

Readiness does not depend on the hub (the outbox absorbs an outage), so this is
where a site sees a backlog or a publication the hub refused, and why.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from starlette.responses import JSONResponse

from exchange.node.deps import Services, SiteTenant
from exchange.node.outbox import FAILED

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/outbox", summary="The tenant's publishing backlog and refused publications")
async def outbox_depth(services: Services, tenant: SiteTenant) -> JSONResponse:
    def load() -> dict[str, object]:
        depth = services.outbox.depth(tenant)
        failed = services.outbox.entries(tenant, FAILED)
        return {
            "tenant": tenant,
            "publishing": services.publisher is not None,
            **depth.as_json(),
            "failures": [
                {"id": e.id, "action": e.action, "attempts": e.attempts, "error": e.last_error}
                for e in failed[:100]
            ],
        }

    return JSONResponse(await anyio.to_thread.run_sync(load))
