-- customer_stats v1: one row per customer. Created without keys or indexes; see indexes.sql.
CREATE TABLE customer_stats (
    customer_id          text        NOT NULL,
    currency             text,
    orders               bigint      NOT NULL,
    lifetime_value_cents bigint      NOT NULL,
    refunded_cents       bigint      NOT NULL,
    first_order_at       timestamptz,
    last_order_at        timestamptz
);
