-- daily_volume v2: per UTC day and currency, the transfers posted. Created without keys.
CREATE TABLE daily_volume (
    day             date   NOT NULL,
    currency        text   NOT NULL,
    transfers       bigint NOT NULL,
    volume_micros   bigint NOT NULL,
    largest_micros  bigint
);
