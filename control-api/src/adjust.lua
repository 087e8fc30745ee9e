-- Applies a committed budget adjustment to the budget period Redis holds.
-- KEYS[1]: "<prefix>:nb:<period>" (settled spend, nano-USD); KEYS[2]: its ":seeded" mark (the
-- Redis second the limiter seeded it from PostgreSQL).
-- ARGV[1]: the adjustment in nano-USD (negative: a credit); ARGV[2]: the Redis second read
-- before the adjustment was committed.
-- Returns 0: Redis does not hold the period (the next seed counts the adjustment); 1: added;
-- 2: the period was seeded while the adjustment was being committed, so the seed may or may not
-- count it: the period is dropped, and the next request seeds it again, counting it once.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seeded = tonumber(redis.call('GET', KEYS[2]) or '0')
if seeded < tonumber(ARGV[2]) then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  return 1
end
redis.call('DEL', KEYS[1], KEYS[2])
return 2
