-- adjust.lua: AdjustUsage. Corrects one metric's committed usage of a month (or
-- of the lifetime total for PERIOD_NONE metrics), once per adjustment_id, and
-- writes the correction to the audit trail in the same step.
--
-- KEYS[1] plan        pm:{org}:plan
-- KEYS[2] month       pm:{org}:u:<YYYY-MM>   the month to correct (plan's timezone)
-- KEYS[3] life        pm:{org}:u:lifetime
-- KEYS[4] adjustment  pm:{org}:adj:<adjustment_id>  hash {fp, res}
-- KEYS[5] audit       pm:{org}:audit         stream (the audit trail)
-- KEYS[6] planlog     pm:{org}:planlog       zset version -> updated_ms
-- KEYS[7] planver     pm:{org}:planver       hash version -> plan JSON
-- KEYS[8] events      pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[9] evstate     pm:{org}:evstate  hash: the events' sequence (_lib.lua, emit)
--
-- ARGV[1] now_ms
-- ARGV[2] timezone the server assumed when it chose the month key
-- ARGV[3] service default timezone
-- ARGV[4] metric
-- ARGV[5] units (signed, not 0)
-- ARGV[6] payload fingerprint
-- ARGV[7] adjustment id TTL (ms)
-- ARGV[8] month id ("YYYY-MM") of KEYS[2]
-- ARGV[9] when the month's counters expire (ms on the now_ms clock)
-- ARGV[10] actor
-- ARGV[11] reason
-- ARGV[12] audit trail length (entries kept, about)
-- ARGV[13] terms instant (ms): the month's end, or now + 1 for the current month
-- ARGV[14] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
-- ARGV[15] '1' when the month of KEYS[2] runs at now_ms (its thresholds are watched)
--
-- Which metrics a month can be corrected for: a lifetime (PERIOD_NONE) metric of
-- today's plan corrects its lifetime total; any other metric that the month's
-- own terms (the plan version in effect at its end) or today's plan name, or
-- that has usage recorded in the month, corrects the month. So a past month can
-- be corrected for a metric its plan had, even if today's plan dropped it.
--
-- Returns {'STALE_TZ', tz}, {'NO_PLAN'}, {'UNKNOWN_METRIC'}, {'REUSED'}, or
--   {'OK', period_id, before, after, duplicate}.
-- Events: usage.corrected for a new correction; threshold.crossed / resolved
-- for the metric's thresholds when it corrects the running period or a
-- lifetime total (_lib.lua, watch_usage).

assert(#KEYS == 9 and #ARGV == 15, 'adjust.lua: wrong number of KEYS or ARGV')
local now = tonumber(ARGV[1])
local metric, units = ARGV[4], tonumber(ARGV[5])
local plan = load_plan(KEYS[1])
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
if not plan then
  return {'NO_PLAN'}
end
local limits = plan.metrics[metric]
if not (limits and limits.period == 'none') then
  -- A monthly correction: the month's own terms decide, as every read of it does.
  local terms = nil
  local ids = redis.call('ZREVRANGEBYSCORE', KEYS[6], '(' .. ARGV[13], '-inf', 'LIMIT', 0, 1)
  if #ids > 0 then
    local json = redis.call('HGET', KEYS[7], ids[1])
    if json then
      terms = cjson.decode(json)
    end
  end
  local in_terms = terms and terms.metrics[metric]
  local recorded = redis.call('HEXISTS', KEYS[2], 'c:' .. metric) == 1
  if not (limits or in_terms or recorded) then
    return {'UNKNOWN_METRIC'}
  end
  limits = {period = 'monthly'}
end
local previous = redis.call('HMGET', KEYS[4], 'fp', 'res')
if previous[1] then
  if previous[1] ~= ARGV[6] then
    return {'REUSED'}
  end
  local res = cjson.decode(previous[2])
  return {'OK', res[1], res[2], res[3], '1'}
end

local bucket, period = bucket_for(limits, KEYS[2], KEYS[3])
local period_id = ARGV[8]
if period == 'N' then
  period_id = 'lifetime'
end
local before = int(redis.call('HGET', bucket, 'c:' .. metric))
local after = math.max(0, before + units)
redis.call('HSET', bucket, 'c:' .. metric, fmt(after))
if period == 'M' then
  redis.call('PEXPIRE', bucket, math.max(1, tonumber(ARGV[9]) - now))
  -- The month moved by after - before (the floor at zero may have cut the
  -- correction short); the all-time total moves by exactly that, never below 0.
  local moved = after - before
  if moved ~= 0 then
    local total = redis.call('HINCRBY', KEYS[3], 'a:' .. metric, fmt(moved))
    if total < 0 then
      redis.call('HSET', KEYS[3], 'a:' .. metric, '0')
    end
  end
end
redis.call('HSET', KEYS[4], 'fp', ARGV[6],
  'res', cjson.encode({period_id, fmt(before), fmt(after)}))
redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[7]))
audit(KEYS[5], ARGV[12], now, ARGV[10], 'usage.adjust', metric,
  cjson.encode({period = period_id, committed = fmt(before)}),
  cjson.encode({period = period_id, committed = fmt(after)}), ARGV[11])
local events = event_sink(KEYS[8], KEYS[9], ARGV[14])
emit(events, now, 'usage.corrected', {
  adjustment_id = string.match(KEYS[4], ':adj:(.*)$'), metric = metric, period = period_id,
  before = fmt(before), after = fmt(after), units = ARGV[5], reason = ARGV[11]})
local terms = plan.metrics[metric]
if terms and (period == 'N' or ARGV[15] == '1') then
  local prepaid_used = period == 'M' and int(redis.call('HGET', bucket, 'pp:' .. metric)) or 0
  watch_usage(events, now, metric, terms, period_id, after, prepaid_used, 'no_longer_holds')
end
return {'OK', period_id, fmt(before), fmt(after), '0'}
