"""Schema migrations (Alembic): a new database gets the newest revision and matches the tables the code
declares; a database at an older revision, or from before migrations, upgrades in place and keeps
its rows. Runs on SQLite, and on PostgreSQL with `pytest --db postgresql`."""

from __future__ import annotations

import os
import subprocess
import sys

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from atelier.storage.db import Base, alembic_config, engine_url, head_revision, make_engine, migrate, revision_of
from conftest import database_url


def test_a_new_database_is_at_the_newest_revision_and_matches_the_tables_in_the_code(tmp_path):
    engine = make_engine(database_url(tmp_path))
    assert revision_of(engine) == head_revision() == "0003"
    with engine.connect() as conn:
        # Empty: every table, column, type and index the code declares was made by a migration.
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert migrate(engine) == ("0003", "0003")  # a second start changes nothing


def test_a_database_at_an_older_revision_upgrades_in_place_and_keeps_its_rows(tmp_path):
    url = database_url(tmp_path)
    engine = make_engine(url, upgrade=False)
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.commit()
        conn.execute(text(
            "INSERT INTO jobs (id, base_model, family, training_file, hyperparameters, seed, status, "
            "cancel_requested, attempts, created_at) VALUES ('ftjob-old', 'chargpt', 'chargpt', 'file-1', '{}', 7, "
            "'running', false, 1, '2026-01-01 00:00:00')"))
        conn.commit()
    assert migrate(engine) == ("0001", "0003")
    with engine.connect() as conn:
        row = conn.execute(text("SELECT seed, status, lease_owner, lease_until FROM jobs")).one()
    assert tuple(row) == (7, "running", None, None)  # a lease-less running job: any worker may requeue it


def test_a_home_from_before_migrations_is_adopted_by_atelier_db_upgrade(tmp_path):
    """The tables create_all made, without the columns and index added since: `atelier db upgrade` adds them,
    stamps the database and brings it to the newest revision, and the key stored before still opens."""
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'atelier.db'}"
    legacy = create_engine(url)
    Base.metadata.create_all(legacy)
    with legacy.begin() as conn:
        for table, column in (("api_keys", "limits"), ("api_keys", "moderation"), ("jobs", "lease_owner"),
                              ("jobs", "lease_until")):
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(text("DROP INDEX ix_usage_key_id_at"))  # and the index usage had then
        conn.execute(text("CREATE INDEX ix_usage_key_id ON usage (key_id)"))
        conn.execute(text("INSERT INTO api_keys (id, name, prefix, hash, scopes, created_at) VALUES "
                          "('key_old', 'old', 'sk-old', :h, '[\"read\"]', '2026-01-01 00:00:00')"), {"h": "a" * 64})
    legacy.dispose()
    env = os.environ | {"ATELIER_HOME": str(home)}
    env.pop("ATELIER_DATABASE_URL", None)
    run = lambda *args: subprocess.run([sys.executable, "-m", "atelier.cli", "db", *args], env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    behind = run("current")
    assert behind.returncode == 1 and "revision none (newest 0003)" in behind.stdout
    upgraded = run("upgrade")
    assert upgraded.returncode == 0 and "upgraded from revision none to 0003" in upgraded.stdout, upgraded.stderr
    assert run("current").returncode == 0
    engine = create_engine(engine_url(url))
    columns = {c["name"] for c in inspect(engine).get_columns("api_keys")}
    assert {"limits", "moderation"} <= columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM api_keys WHERE id = 'key_old'")).scalar() == "old"
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
