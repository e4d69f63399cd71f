"""Container health probe: ``python -m exchange.probe [PATH|URL]`` exits 0 on HTTP 200.

Container images of the project have no curl, and starting the CLI (settings, FastAPI
imports) for a probe every few seconds would cost more than the request: this uses
the standard library only. Without a full URL it calls its own service on loopback at
``EXCHANGE_PORT``, over HTTPS when ``EXCHANGE_TLS_CERT_FILE`` is set. The certificate
chain is checked against ``EXCHANGE_TLS_CA_FILE`` when set; the host name is not, since
the probe dials loopback, which a site's certificate need not name.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

DEFAULT_PATH = "/healthz"
TIMEOUT_SECONDS = 5.0


def target(argument: str | None, env: Mapping[str, str]) -> str:
    """The URL to probe: ``argument`` when it is a URL, else this service on loopback."""
    path = argument or DEFAULT_PATH
    if path.startswith(("http://", "https://")):
        return path
    scheme = "https" if env.get("EXCHANGE_TLS_CERT_FILE") else "http"
    port = env.get("EXCHANGE_PORT") or "8080"
    return f"{scheme}://127.0.0.1:{port}{path if path.startswith('/') else '/' + path}"


def _context(env: Mapping[str, str]) -> ssl.SSLContext:
    ca_file = env.get("EXCHANGE_TLS_CA_FILE")
    context = ssl.create_default_context(cafile=ca_file or None)
    context.check_hostname = False
    if not ca_file:
        # No trust anchor configured: the probe only asks whether its own process answers.
        context.verify_mode = ssl.CERT_NONE
    return context


def probe(url: str, env: Mapping[str, str], timeout: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False, f"{url!r} is not an http(s) URL"
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=_context(env)
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path or "/", headers={"User-Agent": "exchange-probe"})
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{url}: {exc.__class__.__name__}: {exc}"
    finally:
        connection.close()
    return status == 200, f"{url}: HTTP {status}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1:
        print("usage: python -m exchange.probe [PATH|URL]", file=sys.stderr)
        return 2
    healthy, line = probe(target(args[0] if args else None, os.environ), os.environ)
    print(line, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
