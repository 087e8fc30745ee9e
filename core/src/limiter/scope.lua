-- Limits for a batch of requests, each over its scopes (key, user, team, subscription), atomically.
-- Every key a scope uses starts with its prefix in KEYS (e.g. "tg:{key:<uuid>}"), whose braces
-- make it one Redis Cluster slot; on a cluster a call carries one scope of one request.
--
-- ARGV[1] op: "reserve" | "refund" | "settle" | "sync" | "resettle" | "reconcile" | "return"
-- ARGV[2] lease seconds (reserve)      ARGV[3] clock offset seconds (added to Redis TIME; 0 outside tests)
-- ARGV[4] number of requests, then per request:
--   request id, tokens, cost (nano-USD), number of scopes, then per scope 9 fields:
--   KEYS index, rpm (-1: none), tpm (-1), budget nano-USD (-1), budget period
--   (none | daily | weekly | monthly), enforcement (hard | soft | monitor), and
--   a: reserve: spend so far this period to seed a missing budget with ("" if unknown);
--      refund/settle: the second the reservation was made in; sync: when its spend was first
--      settled
--   b: sync: what the fallback admitted by second, "<sec>:<requests>:<tokens>,..."
--   c: sync: what Redis last counted before the outage, "<sec>:<requests>:<tokens>" ("" if none)
--   b: reserve: a quota lease asked with the request, "<lease id>:<slots>:<replicas>:<slice ms>"
--      ("" for none); see "Leases" below
--   b: refund/settle: tokens reserved        c: settle/resettle: the budget period reserved in
--   a: return: "<lease id>:<seq>:<granted second>:<bucket>:<slots back>:<tokens delta>:<unused
--      nano-USD>:<in-flight nano-USD>"; c: the lease's budget period; cost: spend settled from it
--   a: reconcile: the period the spend in `cost` was summed over (PostgreSQL's rollups)
-- For settle and resettle, tokens and cost are what was really used; for sync, cost is the
-- spend and the request id names the sync (applied once: "<prefix>:sync:<id>" marks it).
--
-- resettle: a settlement (cost > 0) or refund (cost 0) sent again after a call that failed, and
-- may or may not have reached Redis: applied to budgets only, and only while the request still
-- holds its reservation, whose removal is the mark that a settlement was applied (windows are
-- left as they are: a missed correction there only errs towards refusing, for a minute).
-- reconcile: raises a scope's spend in the current period to what PostgreSQL recorded, when it
-- is lower than that less what is still reserved (a settlement that never arrived); returns,
-- per request, the nano-USD added.
--
-- Windows (RPM, TPM): a hash of per-second buckets plus 't' (the total of the buckets inside the
-- window), 's' (the last second already taken out of 't'), 'b' (the second the window was made
-- anew: a window made after a replica's last look at it is not the one it saw) and 'f' (how much
-- of a lost window floors have restored so far). Budget: "<prefix>:nb:<period>"
-- holds settled spend; reservations in flight are "<prefix>:nres" (request id -> nano-USD, and
-- "__total") with leases in "<prefix>:nlease", swept on every call.
--
-- Leases: a reserve that asks for one and is admitted in full under hard enforcement also grants
-- up to <slots> more requests like this one (its tokens and cost each), for the replica to admit
-- locally during the slice. A grant takes at most 1/(LEASE_SHARE x replicas) of each limited
-- dimension's headroom, so it shrinks to nothing near the limit (and the replica asks per request
-- again). Granted requests count in the windows at once, in the bucket of the second the slice
-- ends (no request admitted from it can be later), so no sliding minute holds more than the limit.
-- Granted budget is a reservation "<lease id>" that expires LEASE_GRACE after the slice. `return`
-- tells Redis what became of a lease: requests it did not use (or refunded) leave the window,
-- settled token counts replace reserved ones, settled spend is added, and the reservations are
-- set to what is unused ("<lease id>") and in flight ("<lease id>:f", for INFLIGHT_TTL). Each
-- return applies once, in order ("<prefix>:ret:<lease id>" holds the last seq).
--
-- reserve returns, per request, per scope, the 13 fields of `ScopeReply` (redis_limiter.rs, which
-- documents each): {status, reason, now, period, rpm_used, rpm_reset, tpm_used, tpm_reset,
-- budget_left, retry_after, windows, lease_slots, lease_bucket}. status (`Status`): 1 admitted; 2 admitted over a soft or
-- monitor limit (reason says which); 0 refused; -1 the budget must be seeded; 3 would have been
-- admitted, but another scope of the request refused or needs a seed, so nothing of the request
-- was applied. reason (`Reason`): 0 none, 1 rpm, 2 tpm, 3 budget. windows (`Windows`): 1 if the
-- RPM window existed before this call, plus 2 if the TPM one did (a window a replica saw in use
-- within the minute that no longer exists means Redis lost its data). The ops are `Op`.

local op = ARGV[1]
local lease = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(ARGV[3])
local now_us = now * 1000000 + tonumber(t[2])
local WINDOW = 60
-- A lease takes at most this fraction (times the live replicas) of a dimension's headroom.
local LEASE_SHARE = 4
-- Seconds a lease's unused budget outlives its slice (the holder returns it before then).
local LEASE_GRACE = 2
-- Seconds a lease's in-flight budget outlives its holder's last return (at most the request
-- lease); a live holder sends one at least every 2 s while it has requests in flight.
local INFLIGHT_TTL = 10

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
local function period_of(kind, sec)
  local days = math.floor(sec / 86400)
  if kind == 'daily' then
    local y, m, d = civil(days)
    return string.format('d%04d%02d%02d', y, m, d), (days + 1) * 86400
  elseif kind == 'weekly' then
    -- ISO weeks start on Monday; 1970-01-01 was a Thursday.
    local monday = days - ((days + 3) % 7)
    local y, m, d = civil(monday)
    return string.format('w%04d%02d%02d', y, m, d), (monday + 7) * 86400
  elseif kind == 'monthly' then
    local y, m = civil(days)
    local ny, nm = y, m + 1
    if nm == 13 then ny, nm = y + 1, 1 end
    return string.format('m%04d%02d', y, m), days_from_civil(ny, nm, 1) * 86400
  end
  return 'all', 0
end

-- Seconds until the oldest bucket still in the window leaves it (when `remaining` next grows).
-- Under steady traffic the first second looked at has a bucket; a sparse window costs at most
-- one HGET per second of it.
local function oldest_leaves(key, swept)
  for sec = math.max(swept, now - WINDOW) + 1, now do
    local v = redis.call('HGET', key, sec)
    if v and tonumber(v) > 0 then return sec + WINDOW - now end
  end
  return 0
end

-- A window's total, after taking out the buckets that left it, and the seconds until the oldest
-- bucket that still counts leaves.
local function window_use(key)
  local st = redis.call('HMGET', key, 't', 's')
  local existed = st[1] ~= false
  local total = tonumber(st[1] or '0')
  local swept = tonumber(st[2] or '0')
  local edge = now - WINDOW
  if swept < edge then
    local anew = false
    if swept <= edge - WINDOW then
      redis.call('DEL', key)
      total = 0
      anew = true
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
    if anew then redis.call('HSET', key, 'b', now) end
    -- Once a second is enough: an idle window disappears two windows after its last use.
    redis.call('EXPIRE', key, WINDOW * 2)
  end
  return total, (total > 0) and oldest_leaves(key, swept) or 0, swept, existed
end

-- Adds n to the bucket of second `sec` if it still counts (`swept`: the window's 's', if known).
local function window_add(key, sec, n, swept)
  swept = swept or tonumber(redis.call('HGET', key, 's') or '0')
  if sec > swept and sec > now - WINDOW then
    redis.call('HINCRBY', key, sec, n)
    redis.call('HINCRBY', key, 't', n)
  end
end

-- Brings a window up to `floor`, what a replica saw it count at second `fsec` before an outage,
-- if the window was lost since (made anew at or after `fsec`). A lost window holds the floors
-- restored so far ('f') apart from what replicas admitted without it (their syncs' windows) and
-- since, so each replica's floor raises only that part: to the largest floor any replica saw.
-- A window that outlived the outage holds the truth already and is left alone.
local function restore_floor(key, fsec, floor)
  local _, _, swept = window_use(key)
  local st = redis.call('HMGET', key, 'b', 'f')
  local born = tonumber(st[1] or '0')
  if born < fsec then return end
  local restored = tonumber(st[2] or '0')
  if floor > restored then
    window_add(key, fsec, floor - restored, swept)
    redis.call('HSET', key, 'f', floor)
  end
end

-- Seconds until `need` units have left the window.
local function wait_for(key, need)
  local fields = redis.call('HGETALL', key)
  local secs = {}
  for i = 1, #fields, 2 do
    local sec = tonumber(fields[i])
    if sec and sec > now - WINDOW then
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

local function sweep(res_key, lease_key)
  local expired = redis.call('ZRANGEBYSCORE', lease_key, '-inf', now)
  for _, rid in ipairs(expired) do
    local amount = tonumber(redis.call('HGET', res_key, rid) or '0')
    redis.call('HINCRBY', res_key, '__total', -amount)
    redis.call('HDEL', res_key, rid)
    redis.call('ZREM', lease_key, rid)
  end
end

-- Adds settled spend to a budget period, if Redis holds it: a missing one is seeded from
-- PostgreSQL, which records this spend too.
local function add_spend(s, period, cost)
  local budget_key = s.prefix .. ':nb:' .. period
  if cost > 0 and redis.call('EXISTS', budget_key) == 1 then
    redis.call('INCRBY', budget_key, cost)
  end
end

local function release(res_key, lease_key, rid)
  local amount = redis.call('HGET', res_key, rid)
  if amount then
    redis.call('HINCRBY', res_key, '__total', -tonumber(amount))
    redis.call('HDEL', res_key, rid)
    redis.call('ZREM', lease_key, rid)
  end
end

-- Whether a window still holds what was added to it at second `since` (not made anew since).
local function intact(key, since)
  local st = redis.call('HMGET', key, 't', 'b')
  return st[1] ~= false and tonumber(st[2] or '0') <= since
end

-- Sets a reservation to `amount` (removing it at 0); `expires` nil keeps its expiry and never
-- brings back one that already expired.
local function hold(s, id, amount, expires)
  local old = redis.call('HGET', s.res_key, id)
  if not old and not expires then return end
  old = tonumber(old or '0')
  if amount > 0 then
    redis.call('HSET', s.res_key, id, amount)
    if expires then redis.call('ZADD', s.lease_key, expires, id) end
  else
    redis.call('HDEL', s.res_key, id)
    redis.call('ZREM', s.lease_key, id)
  end
  redis.call('HINCRBY', s.res_key, '__total', amount - old)
end

-- Reads the batch.
local requests = {}
local pos = 5
for _ = 1, tonumber(ARGV[4]) do
  local r = {id = ARGV[pos], tokens = tonumber(ARGV[pos + 1]), cost = tonumber(ARGV[pos + 2]), scopes = {}}
  local n = tonumber(ARGV[pos + 3])
  pos = pos + 4
  for _ = 1, n do
    local prefix = KEYS[tonumber(ARGV[pos])]
    table.insert(r.scopes, {
      prefix = prefix, rpm = tonumber(ARGV[pos + 1]), tpm = tonumber(ARGV[pos + 2]),
      budget = tonumber(ARGV[pos + 3]), period_kind = ARGV[pos + 4], enforcement = ARGV[pos + 5],
      a = ARGV[pos + 6], b = ARGV[pos + 7], c = ARGV[pos + 8],
      rpm_key = prefix .. ':rpm', tpm_key = prefix .. ':tpm', res_key = prefix .. ':nres', lease_key = prefix .. ':nlease',
    })
    pos = pos + 9
  end
  table.insert(requests, r)
end

-- Judges one scope of a reservation without changing anything but expired state.
local function judge(r, s)
  local reply = {1, 0, now, '', 0, 0, 0, 0, -1, 0, 0, 0, 0}
  local ends = 0
  s.ttl = 0
  if s.budget >= 0 then
    local period
    period, ends = period_of(s.period_kind, now)
    reply[4] = period
    s.budget_key = s.prefix .. ':nb:' .. period
    -- A period's spend outlives the period by a day (late settlements), then expires.
    s.ttl = (ends > 0) and (ends - now + 86400) or 0
    sweep(s.res_key, s.lease_key)
    local spent = redis.call('GET', s.budget_key)
    if not spent then
      if s.a == '' then
        reply[1] = -1
        return reply
      end
      -- Several requests may seed at once: only the first seed counts.
      if redis.call('SET', s.budget_key, s.a, 'NX') then
        -- When the seed was read: spend settled earlier is in it already (see "spend").
        redis.call('SET', s.budget_key .. ':seeded', now)
        if s.ttl > 0 then
          redis.call('EXPIRE', s.budget_key, s.ttl)
          redis.call('EXPIRE', s.budget_key .. ':seeded', s.ttl)
        end
      end
      spent = redis.call('GET', s.budget_key)
    end
    local reserved = tonumber(redis.call('HGET', s.res_key, '__total') or '0')
    local left = s.budget - tonumber(spent) - reserved
    reply[9] = left
    if r.cost > left or left <= 0 then
      reply[1], reply[2] = 0, 3
      reply[10] = (ends > 0) and (ends - now) or 0
    end
  end
  if s.rpm >= 0 then
    local existed
    reply[5], reply[6], s.rpm_swept, existed = window_use(s.rpm_key)
    if existed then reply[11] = reply[11] + 1 end
    if reply[1] == 1 and reply[5] + 1 > s.rpm then
      reply[1], reply[2], reply[10] = 0, 1, wait_for(s.rpm_key, reply[5] + 1 - s.rpm)
    end
  end
  if s.tpm >= 0 then
    local existed
    reply[7], reply[8], s.tpm_swept, existed = window_use(s.tpm_key)
    if existed then reply[11] = reply[11] + 2 end
    if reply[1] == 1 and reply[7] + r.tokens > s.tpm then
      reply[1], reply[2], reply[10] = 0, 2, wait_for(s.tpm_key, reply[7] + r.tokens - s.tpm)
    end
  end
  if reply[1] == 0 and s.enforcement ~= 'hard' then
    reply[1] = 2
  end
  return reply
end

local function apply(r, s, reply)
  if s.rpm >= 0 then
    window_add(s.rpm_key, now, 1, s.rpm_swept)
    reply[5] = reply[5] + 1
    -- This request may be the window's only use: it leaves a window from now.
    if reply[6] == 0 then reply[6] = WINDOW end
  end
  if s.tpm >= 0 then
    window_add(s.tpm_key, now, r.tokens, s.tpm_swept)
    reply[7] = reply[7] + r.tokens
    if reply[8] == 0 and r.tokens > 0 then reply[8] = WINDOW end
  end
  if s.budget >= 0 then
    redis.call('HSET', s.res_key, r.id, r.cost)
    redis.call('HINCRBY', s.res_key, '__total', r.cost)
    redis.call('ZADD', s.lease_key, now + lease, r.id)
    redis.call('EXPIRE', s.res_key, lease + s.ttl + 60)
    redis.call('EXPIRE', s.lease_key, lease + s.ttl + 60)
    reply[9] = reply[9] - r.cost
  end
end

-- Grants the lease a reservation asked for (see "Leases"), after the request itself was applied.
local function grant(r, s, reply)
  local id, want, replicas, slice_ms = string.match(s.b, '^([^:]+):(%d+):(%d+):(%d+)$')
  if not id or reply[1] ~= 1 or s.enforcement ~= 'hard' then return end
  local parts = LEASE_SHARE * math.max(tonumber(replicas), 1)
  local n = tonumber(want)
  if s.rpm >= 0 then n = math.min(n, math.floor((s.rpm - reply[5]) / parts)) end
  if s.tpm >= 0 and r.tokens > 0 then n = math.min(n, math.floor((s.tpm - reply[7]) / (r.tokens * parts))) end
  if s.budget >= 0 and r.cost > 0 then n = math.min(n, math.floor(reply[9] / (r.cost * parts))) end
  if n < 1 then return end
  local bucket = math.floor((now_us + tonumber(slice_ms) * 1000) / 1000000)
  if s.rpm >= 0 then
    window_add(s.rpm_key, bucket, n, s.rpm_swept)
    reply[5] = reply[5] + n
  end
  if s.tpm >= 0 then
    window_add(s.tpm_key, bucket, n * r.tokens, s.tpm_swept)
    reply[7] = reply[7] + n * r.tokens
  end
  if s.budget >= 0 then
    hold(s, id, n * r.cost, bucket + LEASE_GRACE)
    reply[9] = reply[9] - n * r.cost
  end
  reply[12], reply[13] = n, bucket
end

if op == 'reserve' then
  local out = {}
  for _, r in ipairs(requests) do
    local replies, all_ok = {}, true
    for i, s in ipairs(r.scopes) do
      replies[i] = judge(r, s)
      if replies[i][1] == 0 or replies[i][1] == -1 then all_ok = false end
    end
    for i, s in ipairs(r.scopes) do
      if all_ok then
        apply(r, s, replies[i])
        grant(r, s, replies[i])
      elseif replies[i][1] == 1 or replies[i][1] == 2 then
        replies[i][1] = 3
      end
    end
    table.insert(out, replies)
  end
  return out
end

-- Spend reconcile may add per scope at most this far from PostgreSQL's figure: rollups round
-- each request's cost on their own, and a few nano-USD apart is agreement.
local RECONCILE_SLACK = 1000
local raised = {}

for _, r in ipairs(requests) do
  for _, s in ipairs(r.scopes) do
    if op == 'resettle' then
      if s.budget >= 0 and redis.call('HEXISTS', s.res_key, r.id) == 1 then
        release(s.res_key, s.lease_key, r.id)
        add_spend(s, s.c, r.cost)
      end
    elseif op == 'reconcile' then
      local added = 0
      if s.budget >= 0 then
        sweep(s.res_key, s.lease_key)
        local budget_key = s.prefix .. ':nb:' .. period_of(s.period_kind, now)
        local spent = redis.call('GET', budget_key)
        -- Only the period the figure was summed over, and only one Redis holds already.
        if spent and period_of(s.period_kind, now) == s.a then
          local reserved = tonumber(redis.call('HGET', s.res_key, '__total') or '0')
          local missing = r.cost - tonumber(spent) - reserved
          if missing > RECONCILE_SLACK then
            redis.call('INCRBY', budget_key, missing)
            added = missing
          end
        end
      end
      table.insert(raised, added)
    elseif op == 'refund' then
      local made_at, reserved_tokens = tonumber(s.a), tonumber(s.b)
      if s.rpm >= 0 then window_add(s.rpm_key, made_at, -1) end
      if s.tpm >= 0 then window_add(s.tpm_key, made_at, -reserved_tokens) end
      if s.budget >= 0 then release(s.res_key, s.lease_key, r.id) end
    elseif op == 'settle' then
      local made_at, reserved_tokens = tonumber(s.a), tonumber(s.b)
      -- Tokens: the real count replaces the reservation, in the second it was made.
      if s.tpm >= 0 then window_add(s.tpm_key, made_at, r.tokens - reserved_tokens) end
      if s.budget >= 0 then
        sweep(s.res_key, s.lease_key)
        release(s.res_key, s.lease_key, r.id)
        add_spend(s, s.c, r.cost)
      end
    elseif op == 'return' then
      local id, seq, granted, bucket, slots, tokens, unused, inflight = string.match(s.a,
        '^([^:]+):(%d+):(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+)$')
      local mark = s.prefix .. ':ret:' .. (id or '')
      if id and tonumber(seq) > tonumber(redis.call('GET', mark) or '-1') then
        redis.call('SET', mark, seq, 'EX', 3600)
        granted, bucket = tonumber(granted), tonumber(bucket)
        slots, tokens = tonumber(slots), tonumber(tokens)
        if s.rpm >= 0 and slots ~= 0 and intact(s.rpm_key, granted) then window_add(s.rpm_key, bucket, -slots) end
        if s.tpm >= 0 and tokens ~= 0 and intact(s.tpm_key, granted) then window_add(s.tpm_key, bucket, tokens) end
        if s.budget >= 0 then
          sweep(s.res_key, s.lease_key)
          hold(s, id, tonumber(unused), nil)
          hold(s, id .. ':f', tonumber(inflight), now + math.min(lease, INFLIGHT_TTL))
          -- Spend goes to the budget the slice was carved from; one seeded since (Redis lost it)
          -- was read from PostgreSQL, and the budget reconcile adds what its rows lacked.
          local seeded = tonumber(redis.call('GET', s.prefix .. ':nb:' .. s.c .. ':seeded') or '0')
          if seeded <= granted then add_spend(s, s.c, r.cost) end
        end
      end
    elseif op == 'sync' then
      -- What a replica's fallback admitted while Redis was away, once per sync id.
      if redis.call('SET', s.prefix .. ':sync:' .. r.id, 1, 'NX', 'EX', 3600) then
        -- A Redis that lost its data (restarted empty) is brought up to what it had counted.
        local fsec, frpm, ftpm = string.match(s.c, '^(%-?%d+):(%-?%d+):(%-?%d+)$')
        if fsec then
          fsec, frpm, ftpm = tonumber(fsec), tonumber(frpm), tonumber(ftpm)
          if s.rpm >= 0 then restore_floor(s.rpm_key, fsec, frpm) end
          if s.tpm >= 0 then restore_floor(s.tpm_key, fsec, ftpm) end
        end
        for sec, n, tokens in string.gmatch(s.b, '(%-?%d+):(%-?%d+):(%-?%d+)') do
          sec, n, tokens = tonumber(sec), tonumber(n), tonumber(tokens)
          if s.rpm >= 0 and n ~= 0 then window_add(s.rpm_key, sec, n) end
          if s.tpm >= 0 and tokens ~= 0 then window_add(s.tpm_key, sec, tokens) end
        end
        -- A budget seeded after the spend was settled counts it already.
        if s.budget >= 0 and r.cost > 0 then
          local budget_key = s.prefix .. ':nb:' .. period_of(s.period_kind, now)
          local seeded = tonumber(redis.call('GET', budget_key .. ':seeded') or '0')
          if redis.call('EXISTS', budget_key) == 1 and seeded < tonumber(s.a) then
            redis.call('INCRBY', budget_key, r.cost)
          end
        end
      end
    else
      return redis.error_reply('unknown op ' .. tostring(op))
    end
  end
end
if op == 'reconcile' then return raised end
return 1
