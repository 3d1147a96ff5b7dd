"""The schema brought to the newest version by the alembic migrations beside this module."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig


def migrate(database_url: str) -> None:
    """Bring the schema to the newest version (a no-op when it is there already)."""
    config = AlembicConfig()
    config.set_main_option(
        "script_location", str(resources.files("order_viewer.adapters.postgres") / "migrations")
    )
    config.set_main_option(
        "sqlalchemy.url", database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    )
    command.upgrade(config, "head")
