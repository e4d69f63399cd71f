"""Disk full and read-only storage become declared errors (507 / 503), never a bare 500.

Regression tests for issue 11's fault injection (tests/faults/test_disk.py): a full
disk used to answer STOW-RS 500 "internal error" with FailureReason 0110.
"""

from __future__ import annotations

import errno
import sqlite3

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from exchange.errors import InsufficientStorage, ReadOnlyStorage, storage_failure
from exchange.node.routes.stow import REASON_OUT_OF_RESOURCES, Failure, _settled, _status
from exchange.web import errors


def test_full_and_read_only_file_systems_are_recognised():
    full = storage_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, InsufficientStorage)
    assert full.status == 507
    assert isinstance(storage_failure(OSError(errno.EDQUOT, "quota")), InsufficientStorage)
    read_only = storage_failure(OSError(errno.EROFS, "Read-only file system"))
    assert isinstance(read_only, ReadOnlyStorage)
    assert read_only.status == 503
    assert storage_failure(OSError(errno.EACCES, "denied")) is None
    assert storage_failure(ValueError("no space left on device")) is not None
    assert storage_failure(RuntimeError("boom")) is None


def test_database_drivers_saying_full_or_read_only_are_recognised():
    full = OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    assert isinstance(storage_failure(full), InsufficientStorage)
    ro = OperationalError(
        "INSERT", {}, sqlite3.OperationalError("attempt to write a readonly database")
    )
    assert isinstance(storage_failure(ro), ReadOnlyStorage)

    class DiskFull(Exception):  # what psycopg raises: SQLSTATE 53100
        sqlstate = "53100"

    assert isinstance(storage_failure(OperationalError("x", {}, DiskFull())), InsufficientStorage)
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "full")
    assert isinstance(storage_failure(wrapped), InsufficientStorage)


def test_a_stow_part_refused_for_lack_of_space_says_so_and_the_request_answers_507():
    failure = _settled(OSError(errno.ENOSPC, "full"), "1.2.840.10008.5.1.4.1.1.2", "1.2.3")
    assert isinstance(failure, Failure)
    assert (failure.reason, failure.status, failure.internal) == (
        REASON_OUT_OF_RESOURCES,
        507,
        False,
    )
    assert "storage is full" in failure.message
    assert _status([failure, failure]) == 507
    read_only = _settled(OSError(errno.EROFS, "ro"), "1.2", "1.3")
    assert isinstance(read_only, Failure)
    assert _status([failure, read_only]) == 503
    assert _status([Failure(0x0110, "bug", internal=True)]) == 500


def test_an_unhandled_storage_error_anywhere_answers_507_or_503_not_500():
    app = FastAPI()
    errors.install(app)

    @app.get("/full")
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    @app.get("/fhir/ro")
    def read_only() -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    client = TestClient(app, raise_server_exceptions=False)
    answer = client.get("/full")
    assert answer.status_code == 507
    assert "storage is full" in answer.json()["error"]["message"]
    outcome = client.get("/fhir/ro")
    assert outcome.status_code == 503
    assert outcome.json()["issue"][0]["code"] == "transient"
