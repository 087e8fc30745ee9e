-- A scope's standing as the gateway's limiter holds it (see core/src/limiter/scope.lua for the
-- layout), read without changing anything.
-- KEYS: the budget period "<prefix>:nb:<period>", the reservations "<prefix>:nres", their leases
-- "<prefix>:nlease", the RPM window "<prefix>:rpm" and the TPM window "<prefix>:tpm".
-- ARGV[1]: now (Redis TIME, plus the control API's clock offset in tests).
-- Returns {settled spend in nano-USD (nil: Redis does not hold the period), reserved nano-USD
-- under unexpired leases, requests in the last 60 s, tokens in the last 60 s}.
local now = tonumber(ARGV[1])
local WINDOW = 60

local spent = redis.call('GET', KEYS[1])

-- A lease whose score is at or before now has expired (the limiter sweeps it on its next call).
local reserved = 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now, '+inf')) do
  local amount = redis.call('HGET', KEYS[2], rid)
  if amount then reserved = reserved + tonumber(amount) end
end

-- The per-second buckets inside the window; 't', 's', 'b' and 'f' are the window's bookkeeping.
local function used(key)
  local fields = redis.call('HGETALL', key)
  local total = 0
  for i = 1, #fields, 2 do
    local sec = tonumber(fields[i])
    -- A second after now is a quota lease's slice, counted from its grant (scope.lua).
    if sec and sec > now - WINDOW then
      total = total + tonumber(fields[i + 1])
    end
  end
  return total
end

return {spent or false, reserved, used(KEYS[4]), used(KEYS[5])}
