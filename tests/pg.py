"""A throwaway PostgreSQL server for tests (Debian's ``postgresql`` package)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from exchange.federation import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def unavailable_reason() -> str | None:
    if not _bin("initdb") or not _bin("pg_ctl"):
        return "PostgreSQL server binaries not found (Debian package 'postgresql')"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser: initdb cannot run as root"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server on a free loopback port; yields a SQLAlchemy URL for database 'exchange'."""
    root = Path(tempfile.mkdtemp(prefix="exchange-pg-"))
    data = root / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    assert initdb
    assert pg_ctl

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "exchange", "--no-sync", "-E", "UTF8")
        run(
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        url = f"postgresql+psycopg://exchange@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                with psycopg.connect(
                    f"host=127.0.0.1 port={port} user=exchange dbname=postgres", autocommit=True
                ) as conn:
                    conn.execute("CREATE DATABASE exchange")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url.replace("/postgres", "/exchange")
    finally:
        with contextlib.suppress(Exception):
            run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


#: The switch that runs the integration and end-to-end suites on PostgreSQL (make test does
#: it in a second pass): every federation's hub and nodes get their own database.
SWITCH = "EXCHANGE_TEST_DATABASE"


def requested() -> bool:
    return os.environ.get(SWITCH, "sqlite").lower() in {"postgresql", "postgres", "pg"}


class Databases:
    """One throwaway server for a whole test session, started at the first request; a new
    database for each request (``create`` is ``exchange.federation.database_provider``)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._url: str | None = None
        self._count = 0

    def server_url(self) -> str:
        """URL of the server's ``exchange`` database (started on first use)."""
        if self._url is None:
            self._url = self._stack.enter_context(postgres_server())
        return self._url

    def create(self, name: str) -> str:
        import psycopg
        from sqlalchemy.engine import make_url

        base = make_url(self.server_url())
        self._count += 1
        database = "".join(c if c.isalnum() else "_" for c in name.lower())[:40]
        database = f"{database}_{self._count}"
        with psycopg.connect(
            f"host={base.host} port={base.port} user={base.username} dbname=postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        return base.set(database=database).render_as_string(hide_password=False)

    def close(self) -> None:
        self._stack.close()
