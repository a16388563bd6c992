"""Alembic's entry point: migrate the engine tunesmith.studio.db.migrate passes in (no alembic.ini)."""

from alembic import context

from tunesmith.studio.db import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
