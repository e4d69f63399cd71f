"""Who is at the other end of the TLS connection: the client certificate, per request.

Design (a node's mutual TLS). A node serves three kinds of caller on one port: the
hub (QIDO/WADO with a grant), the site's own systems (STOW-RS with an API key or a
site-system token) and probes (``/healthz``, ``/readyz``). Requiring a client
certificate at the handshake would force one onto every modality gateway and load
balancer. So, like Kubernetes' API server, the node *requests* a certificate and
verifies any offered one against ``tls_client_ca_file`` during the handshake (one
from another CA fails it), and each route decides whether it needs one: a hub grant
is honoured only over a connection that presented a certificate from that CA (and,
with ``tls_client_names``, with one of those names). A stolen grant alone is
worthless; a stolen grant and the hub's key are needed.

uvicorn does not put TLS details in the ASGI scope, so ``PeerCertProtocol`` (its
httptools protocol, passed as ``http=``) adds the ASGI TLS extension
(``scope["extensions"]["tls"]``) from the connection's ``ssl_object``.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Mapping
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from exchange.errors import Forbidden


class PeerCertProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol for HTTPS: the ASGI TLS extension, and a quick shutdown.

    Shutting down, uvicorn closes idle keep-alive connections; over TLS a close waits
    for the peer's close_notify, which an idle pooled client never sends, so every stop
    took the whole graceful timeout (5 s). An idle connection has no answer in flight to
    truncate, so it is aborted instead.
    """

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = tls_extension(transport.get_extra_info("ssl_object"))

    def shutdown(self) -> None:
        if self._tls is not None and (self.cycle is None or self.cycle.response_complete):
            self.transport.abort()
            return
        super().shutdown()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": cast("dict[object, object]", self._tls)}


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any] | None:
    """The ASGI TLS extension of one connection, computed once (the handshake is over)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        # Only verified certificates get this far: CERT_OPTIONAL fails the handshake otherwise.
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


@functools.lru_cache(maxsize=256)
def _names(pem: str) -> frozenset[str]:
    from cryptography import x509

    from exchange.security.tls import certificate_names

    return frozenset(certificate_names(x509.load_pem_x509_certificate(pem.encode())))


def require_hub_certificate(scope: Mapping[str, Any], ca_file: object, names: list[str]) -> None:
    """Refuse (403) a hub grant over a connection without the hub's client certificate.

    ``ca_file`` is ``tls_client_ca_file``: unset means mutual TLS is not configured and
    everything passes (development). Set, the connection must have presented a
    certificate (verified against it at the handshake) and, if ``names`` is not empty,
    one naming one of them.
    """
    if ca_file is None:
        return
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        raise Forbidden(
            "this node answers hub grants only over mutual TLS: the connection presented no "
            "client certificate (the hub's is required)"
        )
    if names and not _names(chain[0]) & set(names):
        raise Forbidden("the client certificate is not the hub's (its name is not accepted)")
