-- reproject's own catalog. Idempotent: applied at every start under a transaction advisory lock.
CREATE SCHEMA IF NOT EXISTS reproject;

-- One row per build of a projection version: the tables live in their own schema, `schema_name`.
CREATE TABLE IF NOT EXISTS reproject.builds (
    build_id          bigserial   PRIMARY KEY,
    projection        text        NOT NULL,
    version           integer     NOT NULL,
    schema_name       text        NOT NULL UNIQUE,
    -- The topics the build reads, joined by ', ' (for people); `topics` below is what counts.
    topic             text        NOT NULL,
    -- loading -> indexing -> catching_up -> ready -> active -> retired -> dropped; failed on error.
    phase             text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    loaded_at         timestamptz,
    swapped_at        timestamptz,
    retired_at        timestamptz,
    history_truncated boolean     NOT NULL DEFAULT false,
    events_replayed   bigint      NOT NULL DEFAULT 0,
    rows_loaded       bigint      NOT NULL DEFAULT 0,
    -- Who is writing this build now (process, host) and how far it got, refreshed every few seconds.
    writer            text,
    progress          jsonb,
    progress_at       timestamptz,
    last_error        text,
    CONSTRAINT builds_phase CHECK (phase IN
        ('loading', 'indexing', 'catching_up', 'ready', 'active', 'retired', 'failed', 'dropped'))
);
CREATE UNIQUE INDEX IF NOT EXISTS builds_one_active ON reproject.builds (projection) WHERE phase = 'active';

-- The topics a build reads, sorted by name (byte order): fixed when the build is created. Inside
-- reproject a partition is one integer, (index in this array - 1) * 2^20 + its partition number
-- (src/source/topics.rs); the SQL below turns positions to and from it.
ALTER TABLE reproject.builds ADD COLUMN IF NOT EXISTS topics text[];
UPDATE reproject.builds SET topics = ARRAY[topic] WHERE topics IS NULL;

-- Per build, topic and partition, the next offset to read: stored in the same transaction as the
-- rows it describes, so a restart resumes exactly where the committed rows end.
CREATE TABLE IF NOT EXISTS reproject.positions (
    build_id        bigint  NOT NULL REFERENCES reproject.builds ON DELETE CASCADE,
    topic           text    NOT NULL,
    partition       integer NOT NULL,
    next_offset     bigint  NOT NULL,
    -- The log's end (high watermark, last offset + 1) when last looked at, for lag.
    log_end_offset  bigint,
    PRIMARY KEY (build_id, topic, partition)
);
-- A catalog from before several topics: its positions are all of the build's one topic.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'reproject' AND table_name = 'positions' AND column_name = 'topic') THEN
        ALTER TABLE reproject.positions ADD COLUMN topic text;
        UPDATE reproject.positions p SET topic = b.topic FROM reproject.builds b WHERE b.build_id = p.build_id;
        ALTER TABLE reproject.positions ALTER COLUMN topic SET NOT NULL;
        ALTER TABLE reproject.positions DROP CONSTRAINT positions_pkey;
        ALTER TABLE reproject.positions ADD PRIMARY KEY (build_id, topic, partition);
    END IF;
END
$$;

-- Where each aggregate's events lie in the log, recorded by a full replay (a by-product of it) so
-- that `reproject replay` reads only that range. `aggregate_index_coverage` says up to which offset
-- (exclusive) each partition was indexed: events past it are found by reading from there to the end.
CREATE TABLE IF NOT EXISTS reproject.aggregate_offsets (
    topic         text    NOT NULL,
    aggregate_id  text    NOT NULL,
    partition     bigint  NOT NULL,
    first_offset  bigint  NOT NULL,
    last_offset   bigint  NOT NULL,
    PRIMARY KEY (topic, aggregate_id, partition)
);
CREATE TABLE IF NOT EXISTS reproject.aggregate_index_coverage (
    topic            text    NOT NULL,
    partition        integer NOT NULL,
    covered_through  bigint  NOT NULL,
    indexed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Operator controls per projection: `reproject pause` / `resume` set `paused`; rebuilds, catch-ups and
-- followers check it between batches and wait while it is set.
CREATE TABLE IF NOT EXISTS reproject.controls (
    projection  text        PRIMARY KEY,
    paused      boolean     NOT NULL DEFAULT false,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text
);

-- Records a build passed over under the `dead-letter` policy: the raw bytes, where they were, what was
-- wrong. `reproject dead-letters retry` applies them once the code is fixed and marks them resolved.
CREATE TABLE IF NOT EXISTS reproject.dead_letters (
    dead_letter_id  bigserial   PRIMARY KEY,
    build_id        bigint      NOT NULL REFERENCES reproject.builds ON DELETE CASCADE,
    projection      text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    kind            text        NOT NULL,
    type_url        text,
    version         integer,
    reason          text        NOT NULL,
    record_key      bytea,
    record_value    bytea       NOT NULL,
    event_id        uuid,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    retried_at      timestamptz,
    retry_error     text,
    resolved_at     timestamptz,
    UNIQUE (build_id, topic, partition, "offset")
);
-- Headers and timestamp: where CloudEvents and Confluent-framed records keep the event's metadata,
-- needed to retry them.
ALTER TABLE reproject.dead_letters ADD COLUMN IF NOT EXISTS header_names text[] NOT NULL DEFAULT '{}';
ALTER TABLE reproject.dead_letters ADD COLUMN IF NOT EXISTS header_values bytea[] NOT NULL DEFAULT '{}';
ALTER TABLE reproject.dead_letters ADD COLUMN IF NOT EXISTS record_timestamp_ms bigint;

-- What the replay of a build saw of the log (records against offset ranges per partition, aggregate
-- sequence gaps), for verification.
ALTER TABLE reproject.builds ADD COLUMN IF NOT EXISTS source_checks jsonb;

-- The hash of the declaration a build's projection version was made from, for a projection defined
-- in a file (`--domain`); NULL for compiled ones. A file edited without a new version no longer
-- matches the builds made from it, and the commands that write refuse to go on.
ALTER TABLE reproject.builds ADD COLUMN IF NOT EXISTS definition_hash text;
-- The hash of the schemas, event types and upcaster steps a file-defined build was made through:
-- when they change, `status` names the live builds made before (a rebuild applies the change).
ALTER TABLE reproject.builds ADD COLUMN IF NOT EXISTS inputs_hash text;

-- Every verification of a build against another: the verdict and the whole report (JSON), kept so
-- that a swap made with `--verify report` can be looked at afterwards.
CREATE TABLE IF NOT EXISTS reproject.verifications (
    verification_id     bigserial   PRIMARY KEY,
    projection          text        NOT NULL,
    candidate_build_id  bigint      NOT NULL REFERENCES reproject.builds ON DELETE CASCADE,
    baseline_build_id   bigint,
    -- strict or report (the policy it was run under), or check (`reproject verify`).
    mode                text        NOT NULL,
    passed              boolean     NOT NULL,
    rows_differing      bigint,
    report              jsonb       NOT NULL,
    verified_at         timestamptz NOT NULL DEFAULT now()
);

-- Settings changed while a command runs (`reproject tune`): max_rate, batch_events, slow_at,
-- pause_at. Read by catch-ups and followers at every pause check.
ALTER TABLE reproject.controls ADD COLUMN IF NOT EXISTS settings jsonb NOT NULL DEFAULT '{}';

-- The processes of a `rebuild --shared`, one row each per build, refreshed as they work: the
-- partitions the consumer group gives them (ids, see `topics` above), what they replayed, how fast.
CREATE TABLE IF NOT EXISTS reproject.workers (
    build_id           bigint      NOT NULL REFERENCES reproject.builds ON DELETE CASCADE,
    worker             text        NOT NULL,
    partitions         integer[]   NOT NULL,
    events_replayed    bigint      NOT NULL,
    events_per_second  float8      NOT NULL,
    seen_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (build_id, worker)
);

-- The aggregate index of a shared build (`rebuild --shared`), in pieces: each process records what
-- its rounds read (per partition id, a range of offsets, and where each aggregate's events lie in
-- it) under the shared set's first build. The process that finishes a build joins the pieces into
-- `aggregate_offsets` once they cover every partition up to the build's targets.
CREATE TABLE IF NOT EXISTS reproject.shared_aggregate_ranges (
    lead_build   bigint  NOT NULL REFERENCES reproject.builds ON DELETE CASCADE,
    partition    integer NOT NULL,
    from_offset  bigint  NOT NULL,
    to_offset    bigint  NOT NULL
);
CREATE TABLE IF NOT EXISTS reproject.shared_aggregate_offsets (
    lead_build    bigint  NOT NULL REFERENCES reproject.builds ON DELETE CASCADE,
    topic         text    NOT NULL,
    aggregate_id  text    NOT NULL,
    partition     bigint  NOT NULL,
    first_offset  bigint  NOT NULL,
    last_offset   bigint  NOT NULL
);
