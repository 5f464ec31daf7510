-- grant.lua: GrantCredits. Adds a credit grant for one metric, once per grant_id.
--
-- KEYS[1] plan     pm:{org}:plan
-- KEYS[2] credits  pm:{org}:credits       hash of credit grants (see _lib.lua)
-- KEYS[3] grant    pm:{org}:g:<grant_id>  hash {fp, metric, units, reason, ms}
-- KEYS[4] audit    pm:{org}:audit         stream (the audit trail)
-- KEYS[5] events   pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[6] evstate  pm:{org}:evstate  hash: the events' sequence (_lib.lua, emit)
--
-- ARGV[1] metric
-- ARGV[2] units (positive)
-- ARGV[3] grant fingerprint
-- ARGV[4] grant id TTL (ms)
-- ARGV[5] now_ms
-- ARGV[6] reason
-- ARGV[7] actor (who made the change, for the audit trail)
-- ARGV[8] audit trail length (entries kept, about)
-- ARGV[9] effective_ms (now when the caller set none)
-- ARGV[10] expires_ms (0: never)
-- ARGV[11] priority (0 to 100)
-- ARGV[12] live grants an organization may have at most
-- ARGV[13] grant_id
-- ARGV[14] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
--
-- Returns one of {'NO_PLAN'}, {'UNKNOWN_METRIC'}, {'REUSED'}, {'TOO_MANY_GRANTS'},
--   {'OK', balance_now, duplicate}.
-- Events: credits.granted for a new grant; threshold.crossed / resolved for the
-- metric's credit thresholds (_lib.lua, watch_credits).

assert(#KEYS == 6 and #ARGV == 14, 'grant.lua: wrong number of KEYS or ARGV')
local metric, now = ARGV[1], tonumber(ARGV[5])
local plan = load_plan(KEYS[1])
if not plan then
  return {'NO_PLAN'}
end
if not plan.metrics[metric] then
  return {'UNKNOWN_METRIC'}
end
local previous = redis.call('HGET', KEYS[3], 'fp')
if previous then
  if previous ~= ARGV[3] then
    return {'REUSED'}
  end
  return {'OK', credit_balance(KEYS[2], metric, now), '1'}
end
-- Grants that can no longer count (drawn to zero, expired, voided) are
-- dropped here, so that the hash stays small; ListCreditGrants shows the
-- others, and the audit trail has every grant.
local live = 0
for _, grants in pairs(load_credits(KEYS[2])) do
  for _, grant in ipairs(grants) do
    if not grant.legacy then
      if grant_can_count(grant, now) then
        live = live + 1
      else
        redis.call('HDEL', KEYS[2], 'g:' .. grant.id)
      end
    end
  end
end
if live >= tonumber(ARGV[12]) then
  return {'TOO_MANY_GRANTS'}
end
local before = credit_balance(KEYS[2], metric, now)
local grant_id = ARGV[13]
local grant = {id = grant_id, metric = metric, remaining = tonumber(ARGV[2]),
  effective = tonumber(ARGV[9]), expires = tonumber(ARGV[10]), priority = tonumber(ARGV[11]),
  units = tonumber(ARGV[2]), state = 'A'}
redis.call('HSET', KEYS[2], 'g:' .. grant_id, encode_grant(grant))
local by_metric = load_credits(KEYS[2])
by_metric[metric] = by_metric[metric] or {}
table.insert(by_metric[metric], grant)
local after = credit_balance(KEYS[2], metric, now)
audit(KEYS[4], ARGV[8], now, ARGV[7], 'credits.grant', metric,
  cjson.encode({balance = fmt(before)}),
  cjson.encode({balance = fmt(after), grant_id = grant_id, units = ARGV[2],
    effective_ms = ARGV[9], expires_ms = ARGV[10], priority = ARGV[11]}), ARGV[6])
local events = event_sink(KEYS[5], KEYS[6], ARGV[14])
emit(events, now, 'credits.granted', {grant_id = grant_id,
  metric = metric, units = ARGV[2], effective_at = ARGV[9], expires_at = ARGV[10],
  priority = ARGV[11], reason = ARGV[6], balance = fmt(after)})
watch_credits(events, now, KEYS[2], metric, plan.metrics[metric], 'no_longer_holds')
redis.call('HSET', KEYS[3], 'fp', ARGV[3], 'metric', metric, 'units', ARGV[2],
  'reason', ARGV[6], 'ms', ARGV[5])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]))
return {'OK', after, '0'}
