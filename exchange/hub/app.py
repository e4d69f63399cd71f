"""The hub's app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from exchange import __version__, metrics
from exchange.config import Settings
from exchange.hub import services
from exchange.hub.broker import PREFIX as BROKER_PREFIX
from exchange.hub.broker import Broker
from exchange.hub.routes import (
    access_codes,
    dicomweb,
    fhir,
    idp,
    mpi,
    shares,
    viewer,
    wellknown,
)
from exchange.web.app import finish
from exchange.web.errors import FHIR_PREFIX


def create_app(settings: Settings) -> FastAPI:
    built = services.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = built.start()
        # One keep-alive client to the nodes for the whole process, closed at shutdown.
        app.state.broker = Broker.open(built)
        try:
            yield
        finally:
            broker, app.state.broker = app.state.broker, None
            await broker.aclose()
            built.close()

    app = FastAPI(title="Exchange hub", version=__version__, lifespan=lifespan)
    app.state.services = built
    # The broker's refusals are FHIR OperationOutcomes too (DESIGN.md §2, "Retrieve").
    app.state.outcome_prefixes = (FHIR_PREFIX, BROKER_PREFIX)
    # Routes are matched in order: the broker's (the most frequent, and overlapping no
    # other) first; the IdP's before fhir, since /fhir/.well-known/… is not a resource type.
    app.include_router(dicomweb.router)
    app.include_router(idp.router)
    app.include_router(fhir.router)
    app.include_router(wellknown.router)
    app.include_router(mpi.router)
    app.include_router(access_codes.router)
    app.include_router(shares.router)
    app.include_router(viewer.router)
    app.mount("/viewer/static", StaticFiles(directory=viewer.STATIC), name="viewer-static")

    def audit_length() -> None:
        metrics.AUDIT_CHAIN_LENGTH.set(built.audit.length())

    return finish(
        app,
        lambda _path: settings.max_body_bytes,
        built.checks,
        settings=settings,
        refresh=[audit_length],
    )
