-- Tollgate schema: identities, catalogue, entitlements, keys, usage and audit.
-- Limits are a JSON object of the same shape everywhere (rpm, tpm, max_budget, budget_period,
-- enforcement); the applications validate them before writing.

CREATE TABLE users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email        text NOT NULL,
    name         text NOT NULL DEFAULT '',
    roles        text[] NOT NULL DEFAULT '{user}'
                 CHECK (roles <@ ARRAY['admin', 'adminReadonly', 'user']::text[]),
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    limits       jsonb NOT NULL DEFAULT '{}',
    -- `sub` of the JWT that first created or last matched this user, if any.
    oidc_subject text UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE teams (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name           text NOT NULL,
    description    text NOT NULL DEFAULT '',
    -- Empty means every model.
    allowed_models text[] NOT NULL DEFAULT '{}',
    limits         jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX teams_name_key ON teams (lower(name));

INSERT INTO teams (id, name, description)
VALUES ('a0000000-0000-4000-8000-000000000001', 'Default Team', 'Every user is a member');

CREATE TABLE team_members (
    team_id    uuid NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL DEFAULT 'member' CHECK (role IN ('member', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX team_members_user_idx ON team_members (user_id);

CREATE TABLE models (
    -- The name clients send.
    id                    text PRIMARY KEY,
    upstream_model        text NOT NULL,
    provider              text,
    context_length        integer,
    input_cost_per_token  numeric NOT NULL DEFAULT 0 CHECK (input_cost_per_token >= 0),
    output_cost_per_token numeric NOT NULL DEFAULT 0 CHECK (output_cost_per_token >= 0),
    enabled               boolean NOT NULL DEFAULT true,
    -- Restricted models need an admin's approval of each subscription.
    restricted            boolean NOT NULL DEFAULT false,
    -- False once a sync no longer finds the model upstream.
    available             boolean NOT NULL DEFAULT true,
    metadata              jsonb NOT NULL DEFAULT '{}',
    synced_at             timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    model_id   text NOT NULL REFERENCES models (id) ON UPDATE CASCADE,
    status     text NOT NULL CHECK (status IN ('pending', 'active', 'suspended', 'cancelled')),
    limits     jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- One live subscription per user and model; cancelled ones are history.
CREATE UNIQUE INDEX subscriptions_live_key ON subscriptions (user_id, model_id)
    WHERE status <> 'cancelled';
CREATE INDEX subscriptions_model_idx ON subscriptions (model_id);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- SHA-256 of the whole key; the key itself is never stored.
    key_hash     bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    key_prefix   text NOT NULL,
    name         text NOT NULL,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    team_id      uuid NOT NULL REFERENCES teams (id),
    -- Empty means every model the user holds an active subscription for.
    models       text[] NOT NULL DEFAULT '{}',
    limits       jsonb NOT NULL DEFAULT '{}',
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    metadata     jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);
CREATE INDEX api_keys_team_idx ON api_keys (team_id);
CREATE INDEX api_keys_models_idx ON api_keys USING gin (models);

-- One row per proxied request, partitioned by month. Ids are not foreign keys: usage outlives
-- the entities it names and must never be refused.
CREATE TABLE usage_logs (
    request_id        text NOT NULL,
    created_at        timestamptz NOT NULL,
    key_id            uuid,
    user_id           uuid,
    team_id           uuid,
    model_id          text,
    subscription_id   uuid,
    endpoint          text NOT NULL,
    status            smallint NOT NULL,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost              numeric NOT NULL DEFAULT 0,
    latency_ms        integer NOT NULL DEFAULT 0,
    ttfb_ms           integer,
    stream            boolean NOT NULL DEFAULT false,
    error_kind        text,
    -- Replays from the spool are idempotent by request id.
    PRIMARY KEY (request_id, created_at)
) PARTITION BY RANGE (created_at);
-- Catches rows whose month has no partition yet, so that no row is ever refused.
CREATE TABLE usage_logs_default PARTITION OF usage_logs DEFAULT;

-- Creates the monthly partitions of usage_logs from the month of `start_at` for `months` months.
CREATE FUNCTION tollgate_ensure_usage_partitions(start_at timestamptz, months integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    m date;
    name text;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        m := (date_trunc('month', start_at AT TIME ZONE 'UTC') + make_interval(months => i))::date;
        name := format('usage_logs_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF usage_logs FOR VALUES FROM (%L) TO (%L)',
                name, (m::timestamp AT TIME ZONE 'UTC'),
                ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
        END IF;
    END LOOP;
END;
$$;
SELECT tollgate_ensure_usage_partitions(now() - interval '1 month', 4);

CREATE INDEX usage_logs_key_time_idx ON usage_logs (key_id, created_at);

-- Rollups: the writer upserts both with each batch; every usage query and budget re-seed reads
-- these, never raw logs. usage_daily serves days and budgets, usage_hourly the hour view.
CREATE TABLE usage_daily (
    day               date NOT NULL,
    key_id            uuid NOT NULL,
    model_id          text NOT NULL,
    user_id           uuid NOT NULL,
    team_id           uuid NOT NULL,
    subscription_id   uuid,
    requests          bigint NOT NULL DEFAULT 0,
    errors            bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost              numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model_id)
);
CREATE INDEX usage_daily_user_idx ON usage_daily (user_id, day);
CREATE INDEX usage_daily_team_idx ON usage_daily (team_id, day);
CREATE INDEX usage_daily_model_idx ON usage_daily (model_id, day);
CREATE INDEX usage_daily_key_idx ON usage_daily (key_id, day);
CREATE INDEX usage_daily_subscription_idx ON usage_daily (subscription_id, day);

CREATE TABLE usage_hourly (
    hour              timestamptz NOT NULL,
    key_id            uuid NOT NULL,
    model_id          text NOT NULL,
    user_id           uuid NOT NULL,
    team_id           uuid NOT NULL,
    subscription_id   uuid,
    requests          bigint NOT NULL DEFAULT 0,
    errors            bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost              numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key_id, model_id)
);
CREATE INDEX usage_hourly_user_idx ON usage_hourly (user_id, hour);
CREATE INDEX usage_hourly_team_idx ON usage_hourly (team_id, hour);

CREATE TABLE audit_logs (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    actor_id    uuid,
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}',
    ip          text,
    request_id  text
);
CREATE INDEX audit_logs_time_idx ON audit_logs (created_at DESC);
CREATE INDEX audit_logs_target_idx ON audit_logs (target_type, target_id);
CREATE INDEX audit_logs_actor_idx ON audit_logs (actor_id);
