-- Built after the bulk load.
ALTER TABLE daily_sales ADD PRIMARY KEY (day, currency);
