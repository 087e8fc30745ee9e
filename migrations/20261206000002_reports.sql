-- Reports (issue 14): latency in the usage rollups, the model sync's last reports.

-- A fixed-bucket latency histogram per rollup row: latency_hist[i] counts the requests whose
-- latency fell in bucket i (tollgate_core::latency: 56 buckets from 0 ms to 600 s and up, each
-- about 20-25% wider than the last). Empty ('{}') for rows written before this column existed.
ALTER TABLE usage_daily ADD COLUMN latency_hist bigint[] NOT NULL DEFAULT '{}';
ALTER TABLE usage_hourly ADD COLUMN latency_hist bigint[] NOT NULL DEFAULT '{}';

-- The histogram (`buckets` entries) of a list of 1-based bucket numbers.
CREATE FUNCTION tollgate_hist_of(picks integer[], buckets integer)
RETURNS bigint[] LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg((SELECT count(*) FROM unnest(picks) p WHERE p = i) ORDER BY i)
    FROM generate_series(1, buckets) i
$$;

-- Two histograms added entry by entry (the shorter one padded with zeros).
CREATE FUNCTION tollgate_hist_add(a bigint[], b bigint[])
RETURNS bigint[] LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT COALESCE(array_agg(COALESCE(x, 0) + COALESCE(y, 0) ORDER BY n), '{}')
    FROM unnest(a, b) WITH ORDINALITY AS u(x, y, n)
$$;

-- The sum of the histograms of a group of rollup rows.
CREATE AGGREGATE tollgate_hist_sum(bigint[]) (
    SFUNC = tollgate_hist_add,
    STYPE = bigint[],
    INITCOND = '{}'
);

-- Usage reports filter and group by subscription; usage_daily has its index already.
CREATE INDEX usage_hourly_subscription_idx ON usage_hourly (subscription_id, hour);

-- Every model sync, manual (POST /models/sync) or scheduled: what it did or why it failed.
-- GET /models/sync shows the latest.
CREATE TABLE model_sync_runs (
    id          bigserial PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    -- manual | scheduled
    trigger     text NOT NULL CHECK (trigger IN ('manual', 'scheduled')),
    actor       text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('success', 'failure')),
    created     text[] NOT NULL DEFAULT '{}',
    updated     text[] NOT NULL DEFAULT '{}',
    unavailable text[] NOT NULL DEFAULT '{}',
    -- Models the run created disabled because LiteLLM lacks a price.
    unpriced    text[] NOT NULL DEFAULT '{}',
    error       text
);
CREATE INDEX model_sync_runs_finished_idx ON model_sync_runs (finished_at DESC);
