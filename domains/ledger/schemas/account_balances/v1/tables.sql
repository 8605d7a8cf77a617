-- account_balances v1: one row per account. Created without keys; see indexes.sql.
CREATE TABLE account_balances (
    account_id              text   NOT NULL,
    owner                   text,
    currency                text,
    status                  text,
    overdraft_limit_micros  bigint,
    balance_micros          bigint NOT NULL,
    transfers               bigint NOT NULL
);
