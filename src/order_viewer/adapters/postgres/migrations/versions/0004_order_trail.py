"""Record what became of every message of an order: its trail.

"Why can't I see order X?" has no answer in `orders` (which keeps only the version that won) nor
in the dead-letter topic (which has no index by order). One row per handled message whose key is
an order id says where it came from and what became of it; no personal data, only coordinates,
digests and reason codes.

- Rows are appended by the writer in the transaction that stores or deletes (stored, unchanged,
  older, deleted) and by the ingest before it acknowledges a dead letter (dead_lettered), never
  updated: an identity `id` orders them as they were recorded, and the index on
  (order_uid, id) is all a page needs (`WHERE order_uid = $1 AND id > $2 ORDER BY id LIMIT n`
  reads only the rows it returns), at the cost of one small index on the writer's path.
- `handled_at` is the recording transaction's time; retention expires by it through a BRIN
  index, which rows appended in time order keep a few pages large and nearly free to maintain,
  where a B-tree on it would be a second index for every row the writer adds.
- The outcome's values are checked here as the API names them; `content_sha256` is null for a
  tombstone or a dead letter, `reason_code` and `reason_detail` are set for a dead letter only.

Revision ID: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE order_trail (
            id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_uid         text        NOT NULL,
            topic             text        NOT NULL,
            kafka_partition   integer     NOT NULL,
            kafka_offset      bigint      NOT NULL,
            message_timestamp timestamptz,
            handled_at        timestamptz NOT NULL DEFAULT now(),
            outcome           text        NOT NULL CHECK (
                outcome IN ('stored', 'unchanged', 'older', 'dead_lettered', 'deleted')
            ),
            content_sha256    bytea,
            reason_code       text,
            reason_detail     text,
            replayed_from     text
        );
        CREATE INDEX order_trail_order_idx ON order_trail (order_uid, id);
        CREATE INDEX order_trail_handled_at_idx ON order_trail USING brin (handled_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE order_trail")
