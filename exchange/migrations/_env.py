"""What both migration environments' ``env.py`` run (Alembic executes ``env.py``)."""

from __future__ import annotations

from typing import Any

from alembic import context

from exchange.migrations import role_metadata, version_table


def _wants_metadata(config: Any) -> bool:
    """Only autogenerate needs the models; upgrades run from the scripts alone."""
    options = getattr(config, "cmd_opts", None)
    return bool(config.attributes.get("with_metadata") or getattr(options, "autogenerate", False))


def run() -> None:
    config = context.config
    role = config.get_main_option("exchange_role") or ""
    options: dict[str, Any] = {
        "version_table": version_table(role),
        "target_metadata": role_metadata(role) if _wants_metadata(config) else None,
        "compare_type": True,
        # SQLite alters tables by copying them; Alembic's batch mode does that.
        "render_as_batch": True,
    }
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **options
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    # Run by the ``alembic`` command itself (a developer): connect to sqlalchemy.url.
    from exchange.database import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as connection:
            context.configure(connection=connection, **options)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
