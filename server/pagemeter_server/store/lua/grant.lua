-- grant.lua: GrantCredits. Adds prepaid credits to one metric, once per grant_id.
--
-- KEYS[1] plan     pm:{org}:plan
-- KEYS[2] credits  pm:{org}:credits       hash metric -> prepaid balance
-- KEYS[3] grant    pm:{org}:g:<grant_id>  hash {fp, metric, units, reason, ms}
-- KEYS[4] audit    pm:{org}:audit         stream (the audit trail)
--
-- ARGV[1] metric
-- ARGV[2] units (positive)
-- ARGV[3] grant fingerprint
-- ARGV[4] grant id TTL (ms)
-- ARGV[5] now_ms
-- ARGV[6] reason
-- ARGV[7] actor (who made the change, for the audit trail)
-- ARGV[8] audit trail length (entries kept, about)
--
-- Returns one of {'NO_PLAN'}, {'UNKNOWN_METRIC'}, {'REUSED'},
--   {'OK', balance, duplicate}.

assert(#KEYS == 4 and #ARGV == 8, 'grant.lua: wrong number of KEYS or ARGV')
local metric = ARGV[1]
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
  return {'OK', int(redis.call('HGET', KEYS[2], metric)), '1'}
end
local balance = redis.call('HINCRBY', KEYS[2], metric, tonumber(ARGV[2]))
audit(KEYS[4], ARGV[8], tonumber(ARGV[5]), ARGV[7], 'credits.grant', metric,
  cjson.encode({balance = fmt(balance - tonumber(ARGV[2]))}),
  cjson.encode({balance = fmt(balance)}), ARGV[6])
redis.call('HSET', KEYS[3], 'fp', ARGV[3], 'metric', metric, 'units', ARGV[2],
  'reason', ARGV[6], 'ms', ARGV[5])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]))
return {'OK', balance, '0'}
