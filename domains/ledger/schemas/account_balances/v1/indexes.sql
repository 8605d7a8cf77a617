ALTER TABLE account_balances ADD PRIMARY KEY (account_id);
CREATE INDEX ON account_balances (owner);
