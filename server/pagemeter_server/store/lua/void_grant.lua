-- void_grant.lua: VoidCreditGrant. What is left of a credit grant stops counting.
--
-- KEYS[1] credits  pm:{org}:credits  hash of credit grants (see _lib.lua)
-- KEYS[2] audit    pm:{org}:audit    stream (the audit trail)
-- KEYS[3] plan     pm:{org}:plan
-- KEYS[4] month    pm:{org}:u:<period id>  the billing period at now (rollover)
-- KEYS[5] previous pm:{org}:u:<period id>  the period before it (rollover)
-- KEYS[6] planlog  pm:{org}:planlog (rollover)
-- KEYS[7] planver  pm:{org}:planver (rollover)
-- KEYS[8] events   pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[9] evstate  pm:{org}:evstate  hash: the events' sequence (_lib.lua, emit)
--
-- ARGV[1] grant_id
-- ARGV[2] now_ms
-- ARGV[3] reason
-- ARGV[4] actor (who made the change, for the audit trail)
-- ARGV[5] audit trail length (entries kept, about)
-- ARGV[6] timezone the server assumed when it chose the period keys
-- ARGV[7] service default timezone (used when the org has no plan)
-- ARGV[8] the bounds of the period of KEYS[4], "<period id>|<start_ms>|<end_ms>|
--         <start_ms of the period before>" (_lib.lua, rollover_period)
-- ARGV[9] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
--
-- Returns {'STALE_TZ', plan_timezone}, {'NOT_FOUND'} (no such grant, one
--   dropped after it ran out, or a rollover grant of a period that is over), or
--   {'OK', voided_units, already_voided}.
-- A rollover grant ("rollover-<period id>-<metric>") is voided by marking its
-- period's hash (rv:<metric>): it is worked out, not stored.
-- Events: credits.voided when it voids a grant (not again when already voided);
-- threshold.crossed / resolved for the metric's credit thresholds.

assert(#KEYS == 9 and #ARGV == 9, 'void_grant.lua: wrong number of KEYS or ARGV')
local now = tonumber(ARGV[2])
local plan = load_plan(KEYS[3])
local stale = stale_timezone(plan, ARGV[6], ARGV[7])
if stale then
  return stale
end
local period = rollover_period(KEYS[4], KEYS[5], KEYS[3], KEYS[6], KEYS[7], ARGV[8])
period_runs(period, now)
local rollover_prefix = 'rollover-' .. period.id .. '-'
if plan and string.sub(ARGV[1], 1, #rollover_prefix) == rollover_prefix then
  local metric = string.sub(ARGV[1], #rollover_prefix + 1)
  add_rollover(KEYS[1], period, metric, plan.metrics[metric], now)
end
-- The grant, and a balance of an earlier release read as this grant
-- ("prepaid-<metric>") when it has not been migrated yet.
local grant, legacy
for metric, grants in pairs(load_credits(KEYS[1])) do
  for _, candidate in ipairs(grants) do
    if candidate.legacy then
      if 'prepaid-' .. metric == ARGV[1] then
        legacy = candidate
      end
    elseif candidate.id == ARGV[1] then
      grant = candidate
    end
  end
end
if not grant and not legacy then
  return {'NOT_FOUND'}
end
if grant and grant.state == 'V' and not legacy then
  return {'OK', 0, '1'}
end
local voided = 0
if legacy then
  -- The balance becomes the voided grant it was read as.
  redis.call('HDEL', KEYS[1], legacy.metric)
  voided = voided + math.max(0, legacy.remaining)
  legacy.state = 'V'
  if not grant then
    grant = prepaid_grant(legacy.metric)
    grant.units = math.max(0, legacy.remaining)
  end
end
if grant.state ~= 'V' then
  voided = voided + grant.remaining
end
grant.remaining, grant.state = 0, 'V'
if grant.rollover then
  redis.call('HSET', grant.rollover, 'rv:' .. grant.metric, '1')
  -- The mark matters while the period runs; a record gives the hash its
  -- retention (record.lua), so a hash without one is not kept for good.
  if redis.call('PTTL', grant.rollover) < 0 then
    redis.call('PEXPIRE', grant.rollover, math.max(1, period.end_ms - now) + 86400000)
  end
else
  redis.call('HSET', KEYS[1], 'g:' .. ARGV[1], encode_grant(grant))
end
audit(KEYS[2], ARGV[5], now, ARGV[4], 'credits.void', grant.metric,
  cjson.encode({grant_id = ARGV[1], remaining = fmt(voided)}),
  cjson.encode({grant_id = ARGV[1], remaining = '0'}), ARGV[3])
local events = event_sink(KEYS[8], KEYS[9], ARGV[9])
emit(events, now, 'credits.voided', {grant_id = ARGV[1],
  metric = grant.metric, voided_units = fmt(voided), reason = ARGV[3]})
watch_credits(events, now, KEYS[1], grant.metric, plan and plan.metrics[grant.metric],
  'no_longer_holds')
return {'OK', voided, '0'}
