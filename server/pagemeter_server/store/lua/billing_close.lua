-- billing_close.lua: CloseBillingPeriod for one organization. Freezes the
-- figures of the organization's billing periods that ended in a billing month,
-- as the server computed them from the period hashes it read, and writes the
-- close to the audit trail in the same step. Idempotent: a month already closed
-- is left as it was.
--
-- KEYS[1] plan     pm:{org}:plan
-- KEYS[2] close    pm:{org}:close:<YYYY-MM>  hash {json, closed_ms, actor}
-- KEYS[3] audit    pm:{org}:audit            stream (the audit trail)
-- KEYS[4..] period pm:{org}:u:<period id>    each period the snapshot covers
--
-- ARGV[1] now_ms
-- ARGV[2] calendar token the server assumed (timezone, and anchors when any)
-- ARGV[3] service default timezone
-- ARGV[4] billing month ("YYYY-MM")
-- ARGV[5] the snapshot (JSON, domain/billing.py snapshot_json)
-- ARGV[6] actor
-- ARGV[7] audit trail length (entries kept, about)
-- ARGV[8..] per period of KEYS[4..], in order: the hash's "field=value" pairs as
--           the server read them, sorted, joined by "\n" (domain/billing.py
--           hash_fingerprint)
--
-- Returns {'STALE_TZ', token}, {'NO_PLAN'}, {'CHANGED'} (a period hash is no
-- longer what the server read: nothing written, read again),
--   {'CLOSED', json} (closed before: its snapshot), or {'OK'}.

assert(#KEYS >= 3 and #ARGV == #KEYS + 4, 'billing_close.lua: wrong number of KEYS or ARGV')
local now = tonumber(ARGV[1])
local plan = load_plan(KEYS[1])
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
if not plan then
  return {'NO_PLAN'}
end
local closed = redis.call('HGET', KEYS[2], 'json')
if closed then
  return {'CLOSED', closed}
end
for i = 4, #KEYS do
  local flat = redis.call('HGETALL', KEYS[i])
  local pairs_read = {}
  for j = 1, #flat, 2 do
    pairs_read[#pairs_read + 1] = flat[j] .. '=' .. flat[j + 1]
  end
  table.sort(pairs_read)
  if table.concat(pairs_read, '\n') ~= ARGV[i + 4] then
    return {'CHANGED'}
  end
end
redis.call('HSET', KEYS[2], 'json', ARGV[5], 'closed_ms', fmt(now), 'actor', ARGV[6])
audit(KEYS[3], ARGV[7], now, ARGV[6], 'billing.close', ARGV[4],
  cjson.encode({closed = false}), ARGV[5], '')
return {'OK'}
