-- Built after the bulk load.
ALTER TABLE order_summary ADD PRIMARY KEY (order_id);
CREATE INDEX order_summary_customer ON order_summary (customer_id);
CREATE INDEX order_summary_status ON order_summary (status);
