"""Fault injection (issue 11): kill -9 during ingest, publishing and audit writing; disk
full and a read-only data directory. Real processes; short mode in CI, long mode with
``EXCHANGE_RELIABILITY=full`` (see ``tests/reliability.py``)."""
