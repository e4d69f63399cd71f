"""Run the hub or a node under uvicorn (uvloop + httptools, see DESIGN.md §3a)."""

from __future__ import annotations

import gc
import logging

import uvicorn

from exchange import logs
from exchange.config import Settings
from exchange.security import tls
from exchange.web.peer import PeerCertProtocol
from exchange.web.protocol import HeaderLimits, guarded_protocol

log = logging.getLogger(__name__)


def run(role: str, settings: Settings) -> int:
    logs.configure(
        settings.log_level,
        settings.log_format,
        service=role if role == "hub" else f"node-{settings.node_id}",
    )
    # Transport first: a production service without HTTPS, or with a plain-HTTP URL,
    # stops here with one line naming the setting, before anything is created.
    tls.require_secure_transport(settings, role)
    context = tls.server_context(settings)
    if role == "hub":
        from exchange.hub.app import create_app
    else:
        from exchange.node.app import create_app
    app = create_app(settings)  # raises ConfigurationError before binding anything
    # Start-up objects live for the whole process: keep the collector from rescanning them,
    # which otherwise costs 40-60 ms pauses in the middle of requests.
    gc.collect()
    gc.freeze()
    log.info("starting", extra={"service": role, "url": settings.base_url()})
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # Over TLS the protocol adds the client certificate to each request's scope (and
        # closes idle connections at once on shutdown).
        # Header size, count and time limits (exchange.web.protocol) over either protocol.
        http=guarded_protocol(
            HeaderLimits.of(settings), PeerCertProtocol if context is not None else None
        ),
        ssl_context_factory=None if context is None else (lambda _config, _default: context),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        server_header=False,
        # Denial-of-service limits (docs/operations.md, "Limits").
        limit_concurrency=settings.server_limit_concurrency,
        backlog=settings.server_backlog,
        timeout_keep_alive=settings.server_keep_alive_seconds,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    return 0
