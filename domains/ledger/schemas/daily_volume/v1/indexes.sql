ALTER TABLE daily_volume ADD PRIMARY KEY (day, currency);
