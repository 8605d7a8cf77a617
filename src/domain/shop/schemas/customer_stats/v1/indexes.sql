-- Built after the bulk load.
ALTER TABLE customer_stats ADD PRIMARY KEY (customer_id);
