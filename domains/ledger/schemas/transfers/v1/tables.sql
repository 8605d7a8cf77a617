-- transfers v1: one row per transfer, as posted. Created without keys.
CREATE TABLE transfers (
    transfer_id     text        NOT NULL,
    debit_account   text        NOT NULL,
    credit_account  text        NOT NULL,
    amount_micros   bigint      NOT NULL,
    currency        text        NOT NULL,
    posted_at       timestamptz NOT NULL
);
