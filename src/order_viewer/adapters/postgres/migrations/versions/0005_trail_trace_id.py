"""Keep, in each trail entry, the id of the trace its message belonged to.

A producer that traces its orders puts a W3C `traceparent` in each message's headers; its trace
id in the trail lets an operator go from "what became of order X" to the spans of that message,
whether or not this service sampled it. Nullable, so the column comes at no cost to the rows
already there.

Revision ID: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE order_trail ADD COLUMN trace_id text")


def downgrade() -> None:
    op.execute("ALTER TABLE order_trail DROP COLUMN trace_id")
