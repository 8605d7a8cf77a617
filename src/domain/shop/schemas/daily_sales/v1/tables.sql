-- daily_sales v1: one row per UTC day and currency. Created without keys; see indexes.sql.
CREATE TABLE daily_sales (
    day            date        NOT NULL,
    currency       text        NOT NULL,
    orders_placed  bigint      NOT NULL,
    orders_paid    bigint      NOT NULL,
    revenue_cents  bigint      NOT NULL,
    refunded_cents bigint      NOT NULL
);
