-- alerts.lua: the sweep of an organization's notification thresholds
-- (docs/events.md, thresholds). Watches every threshold of the plan at now,
-- as the scripts that change the figures do, and resolves those crossed that
-- are no longer watched: a plan change removed them, or their grant is gone.
-- The server runs it after SetPlan and periodically (a period that ended, a
-- grant that comes within its expiry warning, need no call to be noticed).
--
-- KEYS[1] plan      pm:{org}:plan
-- KEYS[2] credits   pm:{org}:credits   hash of credit grants (see _lib.lua)
-- KEYS[3] month     pm:{org}:u:<period id>   the billing period at now
-- KEYS[4] life      pm:{org}:u:lifetime
-- KEYS[5] events    pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[6] evstate   pm:{org}:evstate  hash: the events' sequence, thresholds crossed
--
-- ARGV[1] now_ms
-- ARGV[2] timezone the server assumed when it chose the period key
-- ARGV[3] service default timezone (used when the org has no plan)
-- ARGV[4] period id of KEYS[3]
-- ARGV[5] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
-- ARGV[6] the reason a threshold no longer watched resolves with: 'plan_changed'
--         after SetPlan, 'no_longer_holds' otherwise
--
-- Returns {'STALE_TZ', plan_timezone} or {'OK', events written}.

assert(#KEYS == 6 and #ARGV == 6, 'alerts.lua: wrong number of KEYS or ARGV')
local now = tonumber(ARGV[1])
local plan = load_plan(KEYS[1])
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
local events = event_sink(KEYS[5], KEYS[6], ARGV[5])
if not events then
  return {'OK', 0}
end
local first = int(redis.call('HGET', KEYS[6], 'seq'))
local watched = {}
if plan then
  -- In metric order, so that the events come in the same order every time.
  for _, metric in ipairs(metric_names(plan)) do
    local limits = plan.metrics[metric]
    local bucket, period = bucket_for(limits, KEYS[3], KEYS[4])
    local scope = period == 'N' and 'lifetime' or ARGV[4]
    local committed = int(redis.call('HGET', bucket, 'c:' .. metric))
    local prepaid_used = 0
    if period == 'M' then
      prepaid_used = int(redis.call('HGET', bucket, 'pp:' .. metric))
    end
    watch_usage(events, now, metric, limits, scope, committed, prepaid_used,
      'no_longer_holds', watched)
    watch_credits(events, now, KEYS[2], metric, limits, 'no_longer_holds', watched)
  end
end
local state = redis.call('HGETALL', KEYS[6])
for i = 1, #state, 2 do
  local field, scope = state[i], state[i + 1]
  local metric, threshold = string.match(field, '^a:([^:]+):(.+)$')
  if metric and not watched[field] then
    redis.call('HDEL', KEYS[6], field)
    emit(events, now, 'threshold.resolved', {metric = metric, threshold = threshold,
      kind = string.match(threshold, '^[^:]+'), period = scope ~= '-' and scope or nil,
      reason = ARGV[6]})
  end
end
return {'OK', int(redis.call('HGET', KEYS[6], 'seq')) - first}
