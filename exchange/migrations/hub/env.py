"""Alembic environment of the hub's database."""

from exchange.migrations import _env

_env.run()
