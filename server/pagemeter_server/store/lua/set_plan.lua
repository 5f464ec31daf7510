-- set_plan.lua: SetPlan. Stores an organization's plan, bumps its version and
-- keeps the version in the plan log, so that the usage history can show each
-- month's terms as they were (changing a plan never rewrites history).
--
-- KEYS[1] plan      pm:{org}:plan      hash {json, version, updated_ms, created_ms}
-- KEYS[2] planlog   pm:{org}:planlog   zset version -> updated_ms
-- KEYS[3] planver   pm:{org}:planver   hash version -> plan JSON
-- KEYS[4] audit     pm:{org}:audit     stream (the audit trail)
-- KEYS[5] unplanned pm:{org}:unplanned zset metrics recorded outside the plan
--         (the plan's metrics leave it: they no longer count against its cap)
-- KEYS[6] life      pm:{org}:u:lifetime  kept for good once the org has a plan
--         (record.lua lets it expire while there is none)
-- KEYS[7] events   pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[8] evstate  pm:{org}:evstate  hash: the events' sequence (_lib.lua, emit)
--
-- ARGV[1] plan JSON as built by the server (never re-encoded here)
-- ARGV[2] now_ms
-- ARGV[3] log cutoff (ms): versions replaced before this are no one's terms any
--         more (their months have left the usage retention) and are dropped
-- ARGV[4] actor (who made the change, for the audit trail)
-- ARGV[5] audit trail length (entries kept, about)
-- ARGV[6] the billing calendar the server read from the stored plan ('' for
--         none), which it joined the new anchor to: the plan is stored only if
--         it still has that calendar
-- ARGV[7] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
--
-- Returns {version, previous_json|''}, or {'STALE_CALENDAR'} (nothing written:
-- another SetPlan changed the calendar; the server reads it again).
-- Events: plan.changed, with the new version and document.

assert(#KEYS == 8 and #ARGV == 7, 'set_plan.lua: wrong number of KEYS or ARGV')
local previous = redis.call('HGET', KEYS[1], 'json') or ''
local previous_calendar = previous ~= '' and plan_doc(previous).calendar or ''
if (previous_calendar or '') ~= ARGV[6] then
  return {'STALE_CALENDAR'}
end
-- When the organization's first plan was set (rollovers need a period wholly
-- under a plan): kept from the first SetPlan on. A plan stored before it was
-- kept takes the oldest time its plan log (or, without one, the plan) knows.
if redis.call('HEXISTS', KEYS[1], 'created_ms') == 0 then
  local created = ARGV[2]
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #first == 2 then
    created = first[2]
  elseif previous ~= '' then
    created = redis.call('HGET', KEYS[1], 'updated_ms') or created
  end
  redis.call('HSET', KEYS[1], 'created_ms', created)
end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'json', ARGV[1], 'updated_ms', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], version)
redis.call('HSET', KEYS[3], version, ARGV[1])
for metric, _ in pairs(cjson.decode(ARGV[1]).metrics) do
  redis.call('ZREM', KEYS[5], metric)
end
redis.call('PERSIST', KEYS[6])

-- Of the versions set before the cutoff, all but the newest were replaced
-- before it; the newest may still be the terms of a month inside retention.
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
for i = 1, #old - 1 do
  redis.call('ZREM', KEYS[2], old[i])
  redis.call('HDEL', KEYS[3], old[i])
end
audit(KEYS[4], ARGV[5], tonumber(ARGV[2]), ARGV[4], 'plan.set', fmt(version), previous, ARGV[1], '')
emit(event_sink(KEYS[7], KEYS[8], ARGV[7]), tonumber(ARGV[2]), 'plan.changed',
  {version = fmt(version), plan = ARGV[1]})
return {version, previous}
