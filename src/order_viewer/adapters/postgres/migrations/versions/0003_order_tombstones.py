"""Remember where each deleted order's tombstone came from.

A Kafka tombstone deletes an order; an older message of it delivered again afterwards (a consumer
crash, a replay) must not bring it back. Newest-wins decides by the stored row's partition and
offset, which the delete removes, so the tombstone's own position is kept here instead. Retention
expires these rows as it expires orders.

Revision ID: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE order_tombstones (
            order_uid       text        PRIMARY KEY,
            kafka_partition integer     NOT NULL,
            kafka_offset    bigint      NOT NULL,
            deleted_at      timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX order_tombstones_deleted_at_idx ON order_tombstones (deleted_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE order_tombstones")
