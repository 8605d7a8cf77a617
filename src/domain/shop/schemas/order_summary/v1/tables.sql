-- order_summary v1: one row per order. Created without keys or indexes; see indexes.sql.
CREATE TABLE order_summary (
    order_id       text        NOT NULL,
    customer_id    text,
    status         text,
    item_count     bigint      NOT NULL,
    total_cents    bigint      NOT NULL,
    currency       text,
    paid_cents     bigint      NOT NULL,
    refunded_cents bigint      NOT NULL,
    placed_at      timestamptz,
    paid_at        timestamptz,
    shipped_at     timestamptz,
    cancelled_at   timestamptz,
    ship_city      text,
    ship_country   text,
    last_sequence  bigint,
    updated_at     timestamptz
);
