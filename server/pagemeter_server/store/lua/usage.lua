-- usage.lua: GetUsage. Reads one month of an organization in one atomic step,
-- with the plan terms that applied to that month. It changes no usage; it only
-- drops holds that have expired, so that the held figures it reports are exact.
--
-- KEYS[1] plan      pm:{org}:plan
-- KEYS[2] holds     pm:{org}:holds
-- KEYS[3] holddata  pm:{org}:holddata
-- KEYS[4] held      pm:{org}:held
-- KEYS[5] credits   pm:{org}:credits
-- KEYS[6] month     pm:{org}:u:<YYYY-MM>
-- KEYS[7] life      pm:{org}:u:lifetime
-- KEYS[8] previous  pm:{org}:u:<YYYY-MM> of the month before KEYS[6]
-- KEYS[9] planlog   pm:{org}:planlog   zset version -> updated_ms
-- KEYS[10] planver  pm:{org}:planver   hash version -> plan JSON
-- KEYS[11] events   pm:{org}:events    stream: the org's events (_lib.lua, emit)
-- KEYS[12] evstate  pm:{org}:evstate   hash: the events' sequence (_lib.lua, emit)
--
-- ARGV[1] now_ms
-- ARGV[2] timezone the server assumed when it chose the month key
-- ARGV[3] service default timezone (used when the org has no plan)
-- ARGV[4] terms instant (ms): the month's terms are those of the newest plan
--         version set before it (the month's end; for the current month now + 1),
--         as GetUsageHistory takes them
-- ARGV[5] the bounds of the period of KEYS[6], "<period id>|<start_ms>|<end_ms>|
--         <start_ms of the period before>" (rollover; _lib.lua, rollover_period)
-- ARGV[6] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
--
-- Returns {'STALE_TZ', plan_timezone} or
--   {'OK', terms_json|'', terms_version, month_fields, life_fields, held_fields,
--    credit_fields, previous_month_fields, expired, rollover_fields}
-- terms_json is '' when no plan version was in effect at the terms instant (the
-- plan was set after the month). The timezone check is against the current plan:
-- months are counted in the plan's timezone of today, as in the history.
-- expired: units of holds found expired by this call, "metric:units:0;...".
-- rollover_fields: the period's rollover grants (_lib.lua), as credit_fields
--   would hold them; none unless the period runs at now_ms.
-- where each *_fields is a flat HGETALL array.

assert(#KEYS == 12 and #ARGV == 6, 'usage.lua: wrong number of KEYS or ARGV')
-- The holds it finds expired end here: hold.expired events.
local events = event_sink(KEYS[11], KEYS[12], ARGV[6])
local plan_key, holds_key, holddata_key, held_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])

local raw = redis.call('HMGET', plan_key, 'json', 'version')
local plan = nil
if raw[1] then
  plan = plan_doc(raw[1])
end
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
-- The terms of the month: the newest version set before the terms instant.
-- A plan stored before the plan log existed has no log entries: its current
-- terms are all there is.
local terms_json, terms_version = raw[1] or '', raw[2] or '0'
if plan and redis.call('ZCARD', KEYS[9]) > 0 then
  local ids = redis.call('ZREVRANGEBYSCORE', KEYS[9], '(' .. ARGV[4], '-inf', 'LIMIT', 0, 1)
  if #ids == 0 then
    terms_json, terms_version = '', '0'
  elseif ids[1] ~= terms_version then
    terms_json, terms_version = redis.call('HGET', KEYS[10], ids[1]) or '', ids[1]
  end
end
local expired = purge_expired_holds(holds_key, holddata_key, held_key, now, events)
return {
  'OK', terms_json, terms_version,
  redis.call('HGETALL', KEYS[6]), redis.call('HGETALL', KEYS[7]),
  redis.call('HGETALL', held_key), redis.call('HGETALL', KEYS[5]),
  redis.call('HGETALL', KEYS[8]), expired,
  rollover_fields(plan, rollover_period(KEYS[6], KEYS[8], plan_key, KEYS[9], KEYS[10], ARGV[5]),
    now),
}
