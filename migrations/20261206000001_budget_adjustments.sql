-- Budget adjustments (issue 14): an administrator's credit (negative amount) or debit (positive)
-- of a scope's spend in one budget period. Append-only: a mistake is corrected by another
-- adjustment, never by editing or deleting a row. The gateway's budget seed and reconcile add a
-- period's adjustments to usage_daily's spend, so Redis and PostgreSQL agree on them.
CREATE TABLE budget_adjustments (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    scope        text NOT NULL CHECK (scope IN ('key', 'user', 'team', 'subscription')),
    scope_id     uuid NOT NULL,
    -- The limiter's name of the period it applies to: d20261206, w20261130, m202612, or all.
    period       text NOT NULL,
    -- Nano-USD, as the limiter counts: positive adds spend, negative takes it away.
    amount_nanos bigint NOT NULL CHECK (amount_nanos <> 0),
    reason       text NOT NULL,
    actor        text NOT NULL,
    request_id   text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX budget_adjustments_scope_idx ON budget_adjustments (scope, scope_id, period);

CREATE FUNCTION budget_adjustments_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'budget_adjustments is append-only';
END;
$$;
CREATE TRIGGER budget_adjustments_append_only BEFORE UPDATE OR DELETE ON budget_adjustments
    FOR EACH ROW EXECUTE FUNCTION budget_adjustments_append_only();
