"""Alembic's environment for Atelier's schema. Migrations run through `atelier.storage.db.migrate`
(at every start, and by `atelier db upgrade`), which hands over its open connection."""

from alembic import context

from atelier.storage.db import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters a table by copying it, which Alembic's batch mode does for us.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
