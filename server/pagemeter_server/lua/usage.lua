-- usage.lua: GetUsage. Reads one month of an organization in one atomic step.
-- It changes no usage; it only drops holds that have expired, so that the held
-- figures it reports are exact.
--
-- KEYS[1] plan      pm:{org}:plan
-- KEYS[2] holds     pm:{org}:holds
-- KEYS[3] holddata  pm:{org}:holddata
-- KEYS[4] held      pm:{org}:held
-- KEYS[5] credits   pm:{org}:credits
-- KEYS[6] month     pm:{org}:u:<YYYY-MM>
-- KEYS[7] life      pm:{org}:u:lifetime
-- KEYS[8] previous  pm:{org}:u:<YYYY-MM> of the month before KEYS[6]
--
-- ARGV[1] now_ms
-- ARGV[2] timezone the server assumed when it chose the month key
-- ARGV[3] service default timezone (used when the org has no plan)
--
-- Returns {'STALE_TZ', plan_timezone} or
--   {'OK', plan_json|'', plan_version, month_fields, life_fields, held_fields, credit_fields,
--    previous_month_fields, expired}
-- expired: units of holds found expired by this call, "metric:units:0;...".
-- where each *_fields is a flat HGETALL array.

assert(#KEYS == 8 and #ARGV == 3, 'usage.lua: wrong number of KEYS or ARGV')
local plan_key, holds_key, holddata_key, held_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])

local raw = redis.call('HMGET', plan_key, 'json', 'version')
local plan = nil
if raw[1] then
  plan = cjson.decode(raw[1])
end
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
local expired = purge_expired_holds(holds_key, holddata_key, held_key, now)
return {
  'OK', raw[1] or '', raw[2] or '0',
  redis.call('HGETALL', KEYS[6]), redis.call('HGETALL', KEYS[7]),
  redis.call('HGETALL', held_key), redis.call('HGETALL', KEYS[5]),
  redis.call('HGETALL', KEYS[8]), expired,
}
