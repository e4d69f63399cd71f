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
