-- Control-plane authorization (issue 10).

-- Limits an administrator set on a key, subscription or team. `limits` is what the gateway
-- enforces; `admin_limits` is the ceiling within which the owner (or a team admin) may tighten
-- `limits` but never loosen or remove them. What exists today was set by administrators.
ALTER TABLE api_keys ADD COLUMN admin_limits jsonb NOT NULL DEFAULT '{}';
ALTER TABLE subscriptions ADD COLUMN admin_limits jsonb NOT NULL DEFAULT '{}';
ALTER TABLE teams ADD COLUMN admin_limits jsonb NOT NULL DEFAULT '{}';
UPDATE api_keys SET admin_limits = limits;
UPDATE subscriptions SET admin_limits = limits;
UPDATE teams SET admin_limits = limits;

-- The audit trail keeps the server's own request id (request_id) and, beside it, whatever
-- `x-request-id` the client sent, which proves nothing; and the client's user agent.
ALTER TABLE audit_logs ADD COLUMN client_request_id text;
ALTER TABLE audit_logs ADD COLUMN user_agent text;
