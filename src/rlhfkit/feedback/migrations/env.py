"""Alembic environment: always run programmatically by `Database.migrate()`, on its connection."""

from alembic import context

from rlhfkit.feedback.models import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
