ALTER TABLE transfers ADD PRIMARY KEY (transfer_id);
CREATE INDEX ON transfers (debit_account);
CREATE INDEX ON transfers (credit_account);
