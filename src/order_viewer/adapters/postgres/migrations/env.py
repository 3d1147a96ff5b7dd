"""Alembic environment: runs the versioned migrations over the service's own DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

# Several instances may start at once; one advisory lock lets exactly one of them migrate while
# the others wait and then find nothing left to do.
MIGRATION_LOCK_KEY = 0x6F726465725F76  # "order_v"

url = context.config.get_main_option("sqlalchemy.url")
engine = create_engine(url or "", poolclass=None)
with engine.connect() as connection:
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()
    try:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()
engine.dispose()
