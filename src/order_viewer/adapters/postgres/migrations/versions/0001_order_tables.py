"""Order, delivery, payment and item tables, and the document view the API serves from.

Revision ID: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE orders (
            order_uid          text        PRIMARY KEY
                                           CHECK (order_uid ~ '^[A-Za-z0-9_-]{1,64}$'),
            track_number       text        NOT NULL,
            entry              text        NOT NULL,
            locale             text        NOT NULL,
            internal_signature text        NOT NULL,
            customer_id        text        NOT NULL,
            delivery_service   text        NOT NULL,
            shardkey           text        NOT NULL,
            sm_id              bigint      NOT NULL,
            date_created       timestamptz NOT NULL,
            oof_shard          text        NOT NULL,
            -- Where the stored version came from: a redelivery of an older message must not
            -- overwrite a newer one, and an identical one must change nothing.
            content_sha256     bytea       NOT NULL,
            kafka_partition    integer     NOT NULL,
            kafka_offset       bigint      NOT NULL,
            stored_at          timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX orders_date_created_idx ON orders (date_created DESC, order_uid);

        CREATE TABLE delivery (
            order_uid text PRIMARY KEY REFERENCES orders ON DELETE CASCADE,
            name      text NOT NULL,
            phone     text NOT NULL,
            zip       text NOT NULL,
            city      text NOT NULL,
            address   text NOT NULL,
            region    text NOT NULL,
            email     text NOT NULL
        );

        CREATE TABLE payment (
            order_uid     text   PRIMARY KEY REFERENCES orders ON DELETE CASCADE,
            transaction   text   NOT NULL,
            request_id    text   NOT NULL,
            currency      text   NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
            provider      text   NOT NULL,
            amount        bigint NOT NULL CHECK (amount >= 0),
            payment_dt    bigint NOT NULL CHECK (payment_dt >= 0),
            bank          text   NOT NULL,
            delivery_cost bigint NOT NULL CHECK (delivery_cost >= 0),
            goods_total   bigint NOT NULL CHECK (goods_total >= 0),
            custom_fee    bigint NOT NULL CHECK (custom_fee >= 0)
        );

        CREATE TABLE items (
            order_uid    text    NOT NULL REFERENCES orders ON DELETE CASCADE,
            position     integer NOT NULL CHECK (position >= 0),
            chrt_id      bigint  NOT NULL,
            track_number text    NOT NULL,
            price        bigint  NOT NULL CHECK (price >= 0),
            rid          text    NOT NULL,
            name         text    NOT NULL,
            sale         bigint  NOT NULL CHECK (sale BETWEEN 0 AND 100),
            size         text    NOT NULL,
            total_price  bigint  NOT NULL CHECK (total_price >= 0),
            nm_id        bigint  NOT NULL,
            brand        text    NOT NULL,
            status       bigint  NOT NULL,
            PRIMARY KEY (order_uid, position)
        );

        -- The order exactly as its message carried it (same names, same field order, items in
        -- their original order), as compact JSON text built inside the database so a read or the
        -- cache warm-up costs no per-field work in Python.
        CREATE VIEW order_documents AS
        SELECT o.order_uid,
               o.date_created,
               o.content_sha256,
               row_to_json(document)::text AS document
        FROM orders o
        CROSS JOIN LATERAL (
            SELECT o.order_uid, o.track_number, o.entry,
                   (SELECT row_to_json(d) FROM (
                        SELECT name, phone, zip, city, address, region, email
                        FROM delivery WHERE delivery.order_uid = o.order_uid) d) AS delivery,
                   (SELECT row_to_json(p) FROM (
                        SELECT transaction, request_id, currency, provider, amount, payment_dt,
                               bank, delivery_cost, goods_total, custom_fee
                        FROM payment WHERE payment.order_uid = o.order_uid) p) AS payment,
                   (SELECT coalesce(array_to_json(array_agg(row_to_json(item)
                                                             ORDER BY it.position)), '[]')
                    FROM items it
                    CROSS JOIN LATERAL (
                        SELECT it.chrt_id, it.track_number, it.price, it.rid, it.name, it.sale,
                               it.size, it.total_price, it.nm_id, it.brand, it.status) item
                    WHERE it.order_uid = o.order_uid) AS items,
                   o.locale, o.internal_signature, o.customer_id, o.delivery_service,
                   o.shardkey, o.sm_id,
                   to_char(o.date_created AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
                       || CASE WHEN date_part('microseconds', o.date_created)::bigint % 1000000 = 0
                               THEN '' ELSE to_char(o.date_created AT TIME ZONE 'UTC', '.US') END
                       || 'Z' AS date_created,
                   o.oof_shard
        ) document;
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW order_documents; DROP TABLE items, payment, delivery, orders;")
