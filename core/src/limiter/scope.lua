-- One limit scope (a key, user, team or subscription), atomically. Every key used here starts
-- with KEYS[1], which carries the scope's hash tag, so a scope lives in one Redis Cluster slot.
--
-- KEYS[1]  scope prefix, e.g. "tg:{key:<uuid>}"
-- ARGV[1]  op: "reserve" | "refund" | "settle" | "spend" (add ARGV[8] to the current period's
--          budget: spend admitted by a replica's fallback while Redis was unreachable)
-- ARGV[2]  request id
-- ARGV[3]  rpm limit (-1: none)      ARGV[4] tpm limit (-1: none)
-- ARGV[5]  budget, micro-USD (-1: none)
-- ARGV[6]  budget period: none | daily | weekly | monthly
-- ARGV[7]  tokens: to reserve (reserve, refund) or actually used (settle)
-- ARGV[8]  cost, micro-USD: to reserve (reserve, refund) or actually spent (settle)
-- ARGV[9]  lease seconds (reserve)
-- ARGV[10] clock offset seconds (added to Redis TIME; 0 outside tests)
-- ARGV[11] enforcement: hard | soft | monitor
-- ARGV[12] reserve: spend already recorded this period, to seed a missing budget ("" if unknown)
--          refund/settle: the second the reservation was made in
-- ARGV[13] refund/settle: tokens reserved
-- ARGV[14] settle: the budget period the reservation was made in
--
-- Windows: a hash of per-second buckets ("<second>" -> count) with a running total of those in
-- the last 60 seconds. Budget: "<prefix>:b:<period>" holds settled spend; reservations
-- in flight are "<prefix>:res" (request id -> micro-USD, plus "__total") with leases in
-- "<prefix>:lease" (request id -> expiry), swept on every call.
--
-- reserve returns {status, reason, now, period, rpm_used, rpm_reset, tpm_used, tpm_reset,
--                  budget_left, retry_after}
--   status 1: admitted, 0: refused (reason 1 rpm, 2 tpm, 3 budget), -1: the budget must be seeded,
--   2: admitted over a soft/monitor limit (reason says which).

local prefix = KEYS[1]
local op = ARGV[1]
local id = ARGV[2]
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local period_kind = ARGV[6]
local tokens = tonumber(ARGV[7])
local cost = tonumber(ARGV[8])
local lease = tonumber(ARGV[9])
local offset = tonumber(ARGV[10])
local enforcement = ARGV[11]

local t = redis.call('TIME')
local now = tonumber(t[1]) + offset
local WINDOW = 60

-- Civil date (proleptic Gregorian) of a day number since 1970-01-01.
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- Day number since 1970-01-01 of a civil date.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The budget period a second belongs to, and the second it ends (0: never).
local function period_of(sec)
  local days = math.floor(sec / 86400)
  if period_kind == 'daily' then
    local y, m, d = civil(days)
    return string.format('d%04d%02d%02d', y, m, d), (days + 1) * 86400
  elseif period_kind == 'weekly' then
    -- ISO weeks start on Monday; 1970-01-01 was a Thursday.
    local monday = days - ((days + 3) % 7)
    local y, m, d = civil(monday)
    return string.format('w%04d%02d%02d', y, m, d), (monday + 7) * 86400
  elseif period_kind == 'monthly' then
    local y, m = civil(days)
    local ny, nm = y, m + 1
    if nm == 13 then ny, nm = y + 1, 1 end
    return string.format('m%04d%02d', y, m), days_from_civil(ny, nm, 1) * 86400
  end
  return 'all', 0
end

-- A window is a hash of per-second buckets plus 't' (the total of the buckets still inside the
-- window) and 's' (the last second already taken out of 't'). Buckets leave the total as their
-- second falls out of the window, so a call costs one HMGET, not a scan of 60 buckets.
-- Returns the total and the seconds until the oldest bucket that may count leaves.
local function window_use(key)
  local st = redis.call('HMGET', key, 't', 's')
  local total = tonumber(st[1] or '0')
  local swept = tonumber(st[2] or '0')
  local edge = now - WINDOW
  if swept < edge then
    if swept <= edge - WINDOW then
      -- The newest bucket is older than the window: nothing counts any more.
      redis.call('DEL', key)
      total = 0
    else
      for sec = swept + 1, edge do
        local v = redis.call('HGET', key, sec)
        if v then
          total = total - tonumber(v)
          redis.call('HDEL', key, sec)
        end
      end
    end
    swept = edge
    redis.call('HSET', key, 't', total, 's', swept)
  end
  return total, (total > 0) and (swept + 1 + WINDOW - now) or 0
end

-- Adds n to the bucket of second `sec` if it still counts.
local function window_add(key, sec, n)
  local swept = tonumber(redis.call('HGET', key, 's') or '0')
  if sec > swept and sec > now - WINDOW then
    redis.call('HINCRBY', key, sec, n)
    redis.call('HINCRBY', key, 't', n)
  end
end

-- Seconds until `need` units have left the window.
local function wait_for(key, need)
  local fields = redis.call('HGETALL', key)
  local secs = {}
  for i = 1, #fields, 2 do
    local sec = tonumber(fields[i])
    if fields[i] ~= 't' and fields[i] ~= 's' and sec > now - WINDOW then
      table.insert(secs, {sec, tonumber(fields[i + 1])})
    end
  end
  table.sort(secs, function(a, b) return a[1] < b[1] end)
  local freed = 0
  for _, s in ipairs(secs) do
    freed = freed + s[2]
    if freed >= need then return math.max(1, s[1] + WINDOW - now) end
  end
  return WINDOW
end

local res_key = prefix .. ':res'
local lease_key = prefix .. ':lease'

local function sweep()
  local expired = redis.call('ZRANGEBYSCORE', lease_key, '-inf', now)
  for _, rid in ipairs(expired) do
    local amount = tonumber(redis.call('HGET', res_key, rid) or '0')
    redis.call('HINCRBY', res_key, '__total', -amount)
    redis.call('HDEL', res_key, rid)
    redis.call('ZREM', lease_key, rid)
  end
end

local function release(rid)
  local amount = redis.call('HGET', res_key, rid)
  if amount then
    redis.call('HINCRBY', res_key, '__total', -tonumber(amount))
    redis.call('HDEL', res_key, rid)
    redis.call('ZREM', lease_key, rid)
  end
end

local rpm_key = prefix .. ':rpm'
local tpm_key = prefix .. ':tpm'

if op == 'reserve' then
  local period, ends = period_of(now)
  -- A period's spend outlives the period by a day (late settlements), then expires.
  local ttl = (ends > 0) and (ends - now + 86400) or 0
  local budget_key = prefix .. ':b:' .. period
  local budget_left = -1
  local status, reason, retry = 1, 0, 0
  local soft = enforcement ~= 'hard'

  if budget >= 0 then
    sweep()
    local spent = redis.call('GET', budget_key)
    if not spent then
      if ARGV[12] == '' then
        return {-1, 0, now, period, 0, 0, 0, 0, 0, 0}
      end
      -- Several requests may seed at once: only the first seed counts, never overwriting
      -- spend settled since.
      if redis.call('SET', budget_key, ARGV[12], 'NX') then
        -- When the seed was read: spend settled earlier is in it already (see "spend").
        redis.call('SET', budget_key .. ':seeded', now)
        if ttl > 0 then
          redis.call('EXPIRE', budget_key, ttl)
          redis.call('EXPIRE', budget_key .. ':seeded', ttl)
        end
      end
      spent = redis.call('GET', budget_key)
    end
    local reserved = tonumber(redis.call('HGET', res_key, '__total') or '0')
    budget_left = budget - tonumber(spent) - reserved
    if cost > budget_left or budget_left <= 0 then
      status, reason = 0, 3
      retry = (ends > 0) and (ends - now) or 0
    end
  end
  local rpm_used, rpm_reset = 0, 0
  if rpm >= 0 then
    rpm_used, rpm_reset = window_use(rpm_key)
    if status == 1 and rpm_used + 1 > rpm then
      status, reason, retry = 0, 1, wait_for(rpm_key, rpm_used + 1 - rpm)
    end
  end
  local tpm_used, tpm_reset = 0, 0
  if tpm >= 0 then
    tpm_used, tpm_reset = window_use(tpm_key)
    if status == 1 and tpm_used + tokens > tpm then
      status, reason, retry = 0, 2, wait_for(tpm_key, tpm_used + tokens - tpm)
    end
  end
  if status == 0 and soft then
    status = 2
  end
  if status ~= 0 then
    if rpm >= 0 then
      window_add(rpm_key, now, 1)
      redis.call('EXPIRE', rpm_key, WINDOW * 2)
      rpm_used = rpm_used + 1
    end
    if tpm >= 0 then
      window_add(tpm_key, now, tokens)
      redis.call('EXPIRE', tpm_key, WINDOW * 2)
      tpm_used = tpm_used + tokens
    end
    if budget >= 0 then
      redis.call('HSET', res_key, id, cost)
      redis.call('HINCRBY', res_key, '__total', cost)
      redis.call('ZADD', lease_key, now + lease, id)
      redis.call('EXPIRE', res_key, lease + ttl + 60)
      redis.call('EXPIRE', lease_key, lease + ttl + 60)
      budget_left = budget_left - cost
    end
  end
  return {status, reason, now, period, rpm_used, rpm_reset, tpm_used, tpm_reset, budget_left, retry}
end

if op == 'spend' then
  -- ARGV[12]: when the spend was settled. A budget seeded after that already counts it.
  if budget >= 0 and cost > 0 then
    local period = period_of(now)
    local budget_key = prefix .. ':b:' .. period
    local seeded = tonumber(redis.call('GET', budget_key .. ':seeded') or '0')
    if redis.call('EXISTS', budget_key) == 1 and seeded < tonumber(ARGV[12]) then
      redis.call('INCRBY', budget_key, cost)
    end
  end
  return 1
end


local made_at = tonumber(ARGV[12])
local reserved_tokens = tonumber(ARGV[13] or '0')

if op == 'refund' then
  if rpm >= 0 then window_add(rpm_key, made_at, -1) end
  if tpm >= 0 then window_add(tpm_key, made_at, -reserved_tokens) end
  if budget >= 0 then release(id) end
  return 1
end

if op == 'settle' then
  -- Tokens: replace the reservation by the real count, in the second it was made.
  if tpm >= 0 then window_add(tpm_key, made_at, tokens - reserved_tokens) end
  if budget >= 0 then
    sweep()
    release(id)
    local budget_key = prefix .. ':b:' .. ARGV[14]
    if cost > 0 then
      -- Only a seeded period is added to: a missing one will be seeded from PostgreSQL,
      -- which records this spend too.
      if redis.call('EXISTS', budget_key) == 1 then
        redis.call('INCRBY', budget_key, cost)
      end
    end
  end
  return 1
end

return redis.error_reply('unknown op ' .. tostring(op))
