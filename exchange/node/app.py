"""The node's app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from exchange import __version__, metrics
from exchange.config import Settings
from exchange.node import services
from exchange.node.routes import delete, outbox, qido, stow, wado
from exchange.web.app import finish

DICOMWEB_STOW = "/dicomweb/studies"


def create_app(settings: Settings) -> FastAPI:
    built = services.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built.store.discard_incomplete()
        if built.publisher is not None:
            built.publisher.start()  # the outbox absorbs a hub outage: readiness ignores it
        try:
            yield
        finally:
            built.close()

    app = FastAPI(title=f"Exchange node {settings.node_id}", version=__version__, lifespan=lifespan)
    app.state.services = built
    app.include_router(stow.router)
    app.include_router(qido.router)
    app.include_router(wado.router)
    app.include_router(delete.router)
    app.include_router(outbox.router)

    def limit_for(path: str) -> int:
        # STOW-RS streams instances to disk, so it may be far larger than a JSON body.
        if path.startswith(DICOMWEB_STOW):
            return settings.max_upload_bytes
        return settings.max_body_bytes

    def outbox_depth() -> None:
        depth = built.outbox.depth()
        metrics.OUTBOX_DEPTH.labels("pending").set(depth.pending)
        metrics.OUTBOX_DEPTH.labels("failed").set(depth.failed)

    return finish(app, limit_for, built.checks, settings=settings, refresh=[outbox_depth])
