"""The hub's app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from exchange import __version__
from exchange.config import Settings
from exchange.hub import services
from exchange.hub.routes import fhir, idp, mpi, wellknown
from exchange.web.app import finish


def create_app(settings: Settings) -> FastAPI:
    built = services.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = built
        try:
            yield
        finally:
            built.close()

    app = FastAPI(title="Exchange hub", version=__version__, lifespan=lifespan)
    app.state.services = built
    app.include_router(idp.router)  # before fhir: /fhir/.well-known/… is not a resource type
    app.include_router(fhir.router)
    app.include_router(wellknown.router)
    app.include_router(mpi.router)
    return finish(app, lambda _path: settings.max_body_bytes, built.checks)
