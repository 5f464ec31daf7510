-- list_grants.lua: ListCreditGrants. Reads an organization's credit grants,
-- with the rollover grants of the billing period at now (_lib.lua), which are
-- worked out rather than stored. Changes nothing.
--
-- KEYS[1] plan      pm:{org}:plan
-- KEYS[2] credits   pm:{org}:credits   hash of credit grants (see _lib.lua)
-- KEYS[3] month     pm:{org}:u:<period id>   the billing period at now
-- KEYS[4] previous  pm:{org}:u:<period id>   the period before it
-- KEYS[5] planlog   pm:{org}:planlog
-- KEYS[6] planver   pm:{org}:planver
--
-- ARGV[1] now_ms
-- ARGV[2] timezone the server assumed when it chose the period keys
-- ARGV[3] service default timezone (used when the org has no plan)
-- ARGV[4] the bounds of the period of KEYS[3], "<period id>|<start_ms>|<end_ms>|
--         <start_ms of the period before>" (_lib.lua, rollover_period)
--
-- Returns {'STALE_TZ', plan_timezone} or {'OK', credit_fields, rollover_fields}:
-- flat HGETALL arrays, the rollover grants in the form of the credits hash.

assert(#KEYS == 6 and #ARGV == 4, 'list_grants.lua: wrong number of KEYS or ARGV')
local plan = load_plan(KEYS[1])
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
local period = rollover_period(KEYS[3], KEYS[4], KEYS[1], KEYS[5], KEYS[6], ARGV[4])
return {'OK', redis.call('HGETALL', KEYS[2]), rollover_fields(plan, period, tonumber(ARGV[1]))}
