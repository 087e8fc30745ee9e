-- Budget events (issue 14): a durable outbox. The control API's scanner inserts an event when a
-- scope's spend in its budget period crosses an alert threshold (`budget.threshold`) or, under
-- soft or monitor enforcement, passes max_budget (`limit.exceeded`); the unique key makes that
-- once per threshold, scope and period whatever the number of replicas or restarts (inserts are
-- ON CONFLICT DO NOTHING). The delivery worker POSTs pending events to the webhook, claiming
-- them with FOR UPDATE SKIP LOCKED, and records each attempt here.
CREATE TABLE events (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    type            text NOT NULL CHECK (type IN ('budget.threshold', 'limit.exceeded')),
    scope           text NOT NULL CHECK (scope IN ('key', 'user', 'team', 'subscription')),
    scope_id        uuid NOT NULL,
    -- The budget period as the limiter names it: d20261206, w20261130, m202612, all.
    period          text NOT NULL,
    -- A fraction of max_budget (1 for limit.exceeded).
    threshold       numeric NOT NULL,
    -- USD, when the event was detected.
    spent           numeric NOT NULL,
    max_budget      numeric NOT NULL,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_error      text,
    delivered_at    timestamptz,
    UNIQUE (type, scope, scope_id, period, threshold)
);
CREATE INDEX events_due_idx ON events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX events_time_idx ON events (occurred_at DESC);
