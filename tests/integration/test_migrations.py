"""Schema migrations (Alembic) on SQLite and a throwaway PostgreSQL: the baseline is exactly
the models, old ``create_all`` databases are adopted, upgrades are serialised, and a service
with automatic upgrades off refuses a schema that is behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from sqlmodel import SQLModel

from exchange import migrations
from exchange.database import make_engine
from exchange.errors import ConfigurationError
from tests import pg

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(pg.requested(), reason="covers SQLite and PostgreSQL in the first pass"),
]

KINDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def databases() -> Iterator[pg.Databases]:
    reason = pg.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    found = pg.Databases()
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(params=KINDS)
def fresh(request, tmp_path: Path) -> Iterator[Engine]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        url = request.getfixturevalue("databases").create("migrations")
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


@pytest.mark.parametrize("role", migrations.ROLES)
def test_upgrading_an_empty_database_gives_exactly_the_models(fresh: Engine, role: str):
    before, after = migrations.upgrade(fresh, role)
    assert (before, after) == (None, migrations.head(role))
    assert migrations.differences(fresh, role) == []
    assert _tables(fresh) == {*migrations.TABLES[role], migrations.version_table(role)}
    # A second upgrade is a no-op.
    assert migrations.upgrade(fresh, role) == (after, after)


def test_hub_and_node_histories_can_share_one_database(fresh: Engine):
    for role in migrations.ROLES:
        migrations.upgrade(fresh, role)
    for role in migrations.ROLES:
        assert migrations.differences(fresh, role) == []
        assert migrations.status(fresh, role) == (migrations.head(role),) * 2


def test_the_recorded_heads_are_the_scripts_heads():
    for role in migrations.ROLES:
        assert migrations.script_head(role) == migrations.HEADS[role]


def test_stores_create_the_schema_in_an_empty_database(fresh: Engine):
    migrations.ensure_schema(fresh, "node")
    assert migrations.status(fresh, "node") == (migrations.head("node"),) * 2


def test_every_model_table_belongs_to_exactly_one_role():
    for role in migrations.ROLES:
        migrations.role_metadata(role)  # imports the role's models
    hub, node = (set(migrations.TABLES[r]) for r in migrations.ROLES)
    assert not hub & node
    assert set(SQLModel.metadata.tables) == hub | node


@pytest.mark.parametrize("role", migrations.ROLES)
def test_a_database_made_by_create_all_is_stamped_at_the_baseline(fresh: Engine, role: str):
    # What every start-up did before migrations existed: tables, no version table.
    migrations.role_metadata(role).create_all(fresh)
    table = "audit_head" if role == "hub" else "api_key"
    row = (
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, 7, 'h')"
        if role == "hub"
        else "INSERT INTO api_key (tenant, key_hash, label, created_at) "
        "VALUES ('t', 'k', '', CURRENT_TIMESTAMP)"
    )
    with fresh.begin() as conn:
        conn.execute(text(row))
    # Other commands (stores) never upgrade an existing database: they say what to run.
    with pytest.raises(ConfigurationError, match=rf"run `exchange db upgrade --role {role}`"):
        migrations.ensure_schema(fresh, role)
    migrations.ensure_schema(fresh, role, auto_upgrade=True)  # a service starting
    assert migrations.status(fresh, role) == (migrations.head(role),) * 2
    assert migrations.differences(fresh, role) == []
    with fresh.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 1


def test_a_half_made_database_is_completed(fresh: Engine):
    """A crash during the first start-up left some tables: the baseline adds the rest."""
    metadata = migrations.role_metadata("node")
    metadata.tables["instance"].create(fresh)
    migrations.upgrade(fresh, "node")
    assert migrations.differences(fresh, "node") == []


def test_without_auto_upgrade_a_schema_behind_stops_start_up(fresh: Engine):
    with pytest.raises(ConfigurationError, match=r"run `exchange db upgrade --role hub`"):
        migrations.ensure_schema(fresh, "hub", auto_upgrade=False)
    assert _tables(fresh) == set()  # nothing was created
    migrations.upgrade(fresh, "hub")
    migrations.ensure_schema(fresh, "hub", auto_upgrade=False)


def test_a_schema_newer_than_the_code_is_refused(fresh: Engine):
    migrations.upgrade(fresh, "node")
    with fresh.begin() as conn:
        conn.execute(text("UPDATE alembic_version_node SET version_num = '9999'"))
    for auto in (True, False):
        with pytest.raises(ConfigurationError, match="newer version"):
            migrations.ensure_schema(make_engine(str(fresh.url)), "node", auto_upgrade=auto)


def test_upgrades_racing_on_one_database_are_serialised(fresh: Engine):
    """Several processes starting at once (here: engines in threads, each its own
    connections) all succeed and leave one version row."""
    url = fresh.url.render_as_string(hide_password=False)
    engines = [make_engine(url) for _ in range(6)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def run(engine: Engine) -> None:
        start.wait()
        try:
            migrations.ensure_schema(engine, "hub")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert errors == []
    with fresh.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version_hub")).all() == [
            (migrations.head("hub"),)
        ]


# -- the command line ----------------------------------------------------------------------


def _exchange(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exchange", *args],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_db_commands_and_a_service_that_may_not_upgrade(kind: str, tmp_path: Path, request):
    env = {"EXCHANGE_DATA_DIR": str(tmp_path / "hub"), "EXCHANGE_DEV_MODE": "true"}
    if kind == "postgresql":
        env["EXCHANGE_DATABASE_URL"] = request.getfixturevalue("databases").create("cli")
    else:
        (tmp_path / "hub").mkdir()
        engine = make_engine(f"sqlite:///{tmp_path / 'hub' / 'exchange.db'}")
        engine.connect().close()  # an empty database file
        engine.dispose()

    behind = _exchange(env, "db", "current", "--role", "hub")
    assert behind.returncode == 1
    assert "run `exchange db upgrade --role hub`" in behind.stdout

    # A service told not to upgrade refuses to start, with the command to run, no traceback.
    refused = _exchange(
        {**env, "EXCHANGE_DATABASE_AUTO_UPGRADE": "false", "EXCHANGE_PORT": "1"}, "serve", "hub"
    )
    assert refused.returncode == 2
    assert "exchange db upgrade --role hub" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout

    sql = _exchange(env, "db", "upgrade", "--role", "hub", "--sql")
    assert sql.returncode == 0
    assert "CREATE TABLE fhir_resource" in sql.stdout
    unknown = _exchange(env, "db", "upgrade", "--role", "hub", "--sql", "--from", "7777")
    assert unknown.returncode == 2
    assert "Can't locate revision" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    done = _exchange(env, "db", "upgrade", "--role", "hub")
    assert done.returncode == 0, done.stderr
    assert f"upgraded from (empty) to {migrations.head('hub')}" in done.stdout
    again = _exchange(env, "db", "upgrade", "--role", "hub")
    assert "already at revision" in again.stdout
    current = _exchange(env, "db", "current", "--role", "hub")
    assert (current.returncode, current.stdout.strip()) == (
        0,
        f"hub database: revision {migrations.head('hub')} (head)",
    )


def test_db_upgrade_of_an_unreachable_database_is_a_clear_error(tmp_path: Path):
    from exchange.federation import free_port

    env = {"EXCHANGE_DATABASE_URL": f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"}
    failed = _exchange(env, "db", "upgrade", "--role", "node")
    assert failed.returncode == 1
    assert failed.stderr.startswith("exchange: error: the node database cannot be reached")
    assert "Traceback" not in failed.stderr
