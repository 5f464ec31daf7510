-- set_plan.lua: SetPlan. Stores an organization's plan and bumps its version.
--
-- KEYS[1] plan   pm:{org}:plan   hash {json, version, updated_ms}
--
-- ARGV[1] plan JSON as built by the server (never re-encoded here)
-- ARGV[2] now_ms
--
-- Returns {version, previous_json|''}.

assert(#KEYS == 1 and #ARGV == 2, 'set_plan.lua: wrong number of KEYS or ARGV')
local previous = redis.call('HGET', KEYS[1], 'json') or ''
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'json', ARGV[1], 'updated_ms', ARGV[2])
return {version, previous}
