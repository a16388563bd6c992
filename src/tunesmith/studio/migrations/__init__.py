"""Alembic migrations of the studio's database (tunesmith.studio.db runs them at start-up)."""
