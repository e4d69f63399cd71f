"""Alembic environment of the node's database."""

from exchange.migrations import _env

_env.run()
