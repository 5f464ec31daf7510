-- release.lua: ReleaseQuota. Frees the hold of a job that will not run.
-- Idempotent: releasing again reports what happened the first time.
--
-- KEYS[1] holds     pm:{org}:holds
-- KEYS[2] holddata  pm:{org}:holddata
-- KEYS[3] held      pm:{org}:held
-- KEYS[4] record    pm:{org}:r:<request_id>
-- KEYS[5] events    pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[6] evstate   pm:{org}:evstate  hash: the events' sequence (_lib.lua, emit)
--
-- ARGV[1] now_ms
-- ARGV[2] request_id
-- ARGV[3] record TTL (ms): how long a release of an unknown id is remembered
-- ARGV[4] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
--
-- Returns {outcome, released, expired} where outcome is one of 'released',
-- 'already_released', 'expired', 'already_recorded', 'not_found', released
-- is "metric:units:prepaid;..." of the freed hold ('' otherwise), and expired
-- the units of holds found expired by this call.
-- Events: hold.released when it frees a hold; hold.expired for each hold it
-- finds expired.
--
-- Releasing an id nobody holds leaves a mark ('released', 'nf') for the record
-- TTL: a CheckQuota hold with that id arriving later (a call that timed out
-- while Redis stalled and ran when it resumed) is then refused instead of
-- holding units nobody will release. So "release after an unknown outcome"
-- leaves no hold, whichever of the two Redis runs first.

local holds_key, holddata_key, held_key, record_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local request_id = ARGV[2]
assert(#KEYS == 6 and #ARGV == 4, 'release.lua: wrong number of KEYS or ARGV')
local events = event_sink(KEYS[5], KEYS[6], ARGV[4])

local expired = purge_expired_holds(holds_key, holddata_key, held_key, now, events)
local status = redis.call('HMGET', record_key, 'st', 'nf')
if not status[1] then
  redis.call('HSET', record_key, 'st', 'released', 'relms', ARGV[1], 'nf', '1')
  redis.call('PEXPIRE', record_key, tonumber(ARGV[3]))
  return {'not_found', '', expired}
end
if status[1] == 'completed' or status[1] == 'failed' then
  return {'already_recorded', '', expired}
end
if status[1] == 'released' then
  if status[2] == '1' then
    return {'not_found', '', expired}
  end
  return {'already_released', '', expired}
end
local parts = drop_hold(holds_key, holddata_key, held_key, request_id)
if not parts then
  return {'expired', '', expired}
end
redis.call('HSET', record_key, 'st', 'released', 'relms', ARGV[1])
emit(events, now, 'hold.released', {request_id = request_id, metrics = hold_event_metrics(parts)})
return {'released', encode_hold(parts), expired}
