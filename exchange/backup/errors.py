"""Errors of backup and restore: one line for the operator, exit code 1 (never a traceback)."""

from __future__ import annotations

from exchange.errors import ExchangeError


class BackupError(ExchangeError):
    """A backup, verification or restore cannot go on; nothing half-done is left behind."""

    status = 500
    code = "exception"


class MissingFile(BackupError):
    """A file the manifest lists is not at the backup location."""
