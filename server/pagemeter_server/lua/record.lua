-- record.lua: RecordUsage. Commits a finished job's units exactly once per
-- request_id, frees the job's hold, and says which pool paid for each unit.
--
-- KEYS[1] plan      pm:{org}:plan
-- KEYS[2] holds     pm:{org}:holds
-- KEYS[3] holddata  pm:{org}:holddata
-- KEYS[4] held      pm:{org}:held
-- KEYS[5] credits   pm:{org}:credits
-- KEYS[6] month     pm:{org}:u:<YYYY-MM>   the month of completed_at in the plan's timezone
-- KEYS[7] life      pm:{org}:u:lifetime
-- KEYS[8] record    pm:{org}:r:<request_id>
-- KEYS[9] day       pm:{org}:d:<YYYY-MM-DD>  the day of completed_at in the plan's timezone
-- KEYS[10] index    pm:{org}:recs            zset request_id -> requested-at (ms)
--
-- ARGV[1] now_ms
-- ARGV[2] timezone the server assumed when it chose the month key
-- ARGV[3] service default timezone (used when the org has no plan)
-- ARGV[4] month id ("YYYY-MM") of KEYS[6]
-- ARGV[5] when the month's counters expire (ms on the now_ms clock)
-- ARGV[6] record TTL (ms): how long the request_id is remembered
-- ARGV[7] payload fingerprint
-- ARGV[8] success: '1' or '0'
-- ARGV[9] completed_ms
-- ARGV[10] requested_ms, '' for "the hold's creation time, else completed_ms"
-- ARGV[11] document type ('' for none)
-- ARGV[12] request_id
-- ARGV[13] when the day's counters expire (ms on the now_ms clock)
-- ARGV[14] records index cutoff (ms): entries requested earlier leave the index
-- ARGV[15] records index cap (entries)
-- ARGV[16] metric count N, then ARGV[17..] N pairs: metric, units
--
-- Returns one of:
--   {'STALE_TZ', plan_timezone}   the server must recompute the month and retry
--   {'REUSED', status}            request_id was recorded with another payload (nothing changed)
--   {'NEGATIVE', metric}          negative units for a metric that is not PERIOD_NONE (nothing changed)
--   {'OK', duplicate, status, hold_released, hold_expired, over_limit, month_id,
--    completed_ms, rows, expired}
-- expired: units of holds found expired by this call, "metric:units:0;...".
-- status is 'completed' or 'failed'. rows, per metric sorted by name: metric,
--   units, included, prepaid, overage, committed_after, quota|'', hard_limit|'',
--   over_quota, over_hard_limit, overage_not_allowed, period ('M'/'N'), overage_price.
-- A metric that is not in the plan (or an org without a plan) is still recorded,
-- as a monthly metric with no limits: work that was done is never dropped.
--
-- Besides the month, a new record also adds to (all in this one atomic step):
--   the day's hash: c:<m> units, ok / failed jobs, and per document type
--     tc:<type>:<m>, tok:<type>, tfail:<type> (monthly metrics only: lifetime
--     gauges are not usage); at most MAX_DAY_TYPES types a day, later ones
--     count as '_other';
--   the lifetime hash: a:<m>, all successful units ever, for monthly metrics;
--   the records index, by requested-at.
-- A record that only moves PERIOD_NONE gauges is not a job: it adds to no job
-- or day counter. The record keeps the units the job reported ('att'), so the
-- log of a failed job shows what it tried.

local plan_key, holds_key, holddata_key, held_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local credits_key, month_key, life_key, record_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local day_key, index_key = KEYS[9], KEYS[10]
local MAX_DAY_TYPES = 100
local now = tonumber(ARGV[1])
local month_id = ARGV[4]
local month_expire_at = tonumber(ARGV[5])
local record_ttl = tonumber(ARGV[6])
local fingerprint = ARGV[7]
local success = ARGV[8] == '1'
local completed_ms = ARGV[9]
local requested_ms = ARGV[10]
local document_type = ARGV[11]
local request_id = ARGV[12]
local day_expire_at = tonumber(ARGV[13])
local index_cutoff = tonumber(ARGV[14])
local index_cap = tonumber(ARGV[15])
local count = tonumber(ARGV[16])
assert(#KEYS == 10 and #ARGV == 16 + 2 * count, 'record.lua: wrong number of KEYS or ARGV')

local plan = load_plan(plan_key)
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
local metrics = (plan and plan.metrics) or {}

-- Idempotency: the id is claimed in the same atomic step as the write.
local existing = redis.call('HMGET', record_key, 'st', 'fp', 'hr', 'he', 'ol', 'mid', 'cms', 'res')
local status = existing[1]
if status == 'completed' or status == 'failed' then
  if existing[2] ~= fingerprint then
    return {'REUSED', status}
  end
  return {'OK', '1', status, existing[3], existing[4], existing[5], existing[6], existing[7],
    existing[8], ''}
end

local requests = {}
for i = 1, count do
  local metric, n = ARGV[15 + 2 * i], tonumber(ARGV[16 + 2 * i])
  if n < 0 and not (metrics[metric] and metrics[metric].per == 'N') then
    return {'NEGATIVE', metric}
  end
  requests[i] = {metric, n}
end
table.sort(requests, function(a, b) return a[1] < b[1] end)
-- The units the job reported, kept with its record even when it failed (a
-- failed job consumes nothing, but its log shows what it tried).
local requests_as_parts = {}
for i, req in ipairs(requests) do
  requests_as_parts[i] = {req[1], req[2], 0}
end

-- Free this job's hold before pricing the units, so its own prepaid
-- reservation is available to it.
local expired = purge_expired_holds(holds_key, holddata_key, held_key, now)
local hold_released, hold_expired = false, false
if status == 'held' then
  if drop_hold(holds_key, holddata_key, held_key, request_id) then
    hold_released = true
  else
    hold_expired = true
  end
elseif status == 'expired' then
  hold_expired = true
end
if requested_ms == '' then
  requested_ms = redis.call('HGET', record_key, 'rms') or completed_ms
end

local rows = {}
local over_limit = false
for i, req in ipairs(requests) do
  local metric, n = req[1], req[2]
  local limits = metrics[metric] or {}
  local bucket, period = bucket_for(limits, month_key, life_key)
  local quota, hard = limits.q, limits.h
  local included, prepaid, overage, committed = 0, 0, 0, 0
  if not success then
    n = 0
    committed = int(redis.call('HGET', bucket, 'c:' .. metric))
  elseif n < 0 then
    -- Lowering a lifetime gauge (never below zero).
    local before = int(redis.call('HGET', bucket, 'c:' .. metric))
    committed = math.max(0, before + n)
    redis.call('HSET', bucket, 'c:' .. metric, fmt(committed))
  else
    local before = int(redis.call('HGET', bucket, 'c:' .. metric))
    included = n
    if quota then
      included = math.min(n, math.max(0, quota - before))
    end
    local beyond = n - included
    if beyond > 0 then
      -- Prepaid credits reserved by other jobs' holds stay theirs.
      local balance = int(redis.call('HGET', credits_key, metric))
      local reserved = int(redis.call('HGET', held_key, 'hp:' .. metric))
      prepaid = math.min(beyond, math.max(0, balance - reserved))
      if prepaid > 0 then
        redis.call('HINCRBY', credits_key, metric, -prepaid)
        redis.call('HINCRBY', bucket, 'pp:' .. metric, prepaid)
      end
    end
    overage = beyond - prepaid
    committed = redis.call('HINCRBY', bucket, 'c:' .. metric, n)
  end
  local over_quota = quota ~= nil and committed > quota
  local over_hard = hard ~= nil and committed > hard
  local overage_not_allowed = overage > 0 and not limits.o
  over_limit = over_limit or over_hard or overage_not_allowed
  rows[i] = {
    metric, fmt(n), fmt(included), fmt(prepaid), fmt(overage), fmt(committed),
    opt(quota), opt(hard), bool01(over_quota), bool01(over_hard),
    bool01(overage_not_allowed), period, limits.op or '0',
  }
end

-- A job is work on a monthly metric. A record that only moves lifetime gauges
-- (an application created, a template deleted) is not a document job: it is
-- kept as a record but counts in no job or day counter.
local is_job = false
for _, row in ipairs(rows) do
  if row[12] == 'M' then
    is_job = true
  end
end

local final_status = 'failed'
if success then
  final_status = 'completed'
end
if is_job then
  -- The day's counters, for statistics by date and by document type.
  local day_type = document_type
  if redis.call('HEXISTS', day_key, 'tok:' .. day_type) == 0
      and redis.call('HEXISTS', day_key, 'tfail:' .. day_type) == 0 then
    if int(redis.call('HGET', day_key, 'ntypes')) >= MAX_DAY_TYPES then
      day_type = '_other'
    else
      redis.call('HINCRBY', day_key, 'ntypes', 1)
    end
  end
  for _, row in ipairs(rows) do
    local metric, n = row[1], tonumber(row[2])
    if row[12] == 'M' and n > 0 then
      redis.call('HINCRBY', day_key, 'c:' .. metric, n)
      redis.call('HINCRBY', day_key, 'tc:' .. day_type .. ':' .. metric, n)
      redis.call('HINCRBY', life_key, 'a:' .. metric, n)
    end
  end
  if success then
    redis.call('HINCRBY', month_key, 'jobs_ok', 1)
    redis.call('HINCRBY', day_key, 'ok', 1)
    redis.call('HINCRBY', day_key, 'tok:' .. day_type, 1)
  else
    redis.call('HINCRBY', month_key, 'jobs_failed', 1)
    redis.call('HINCRBY', day_key, 'failed', 1)
    redis.call('HINCRBY', day_key, 'tfail:' .. day_type, 1)
  end
  redis.call('PEXPIRE', day_key, math.max(1, day_expire_at - now))
end
-- Relative to the call's clock, not Redis's, so the expiry follows the same time
-- as the rules (tests drive that clock).
redis.call('PEXPIRE', month_key, math.max(1, month_expire_at - now))

local encoded = encode_rows(rows)
redis.call('HSET', record_key, 'st', final_status, 'fp', fingerprint, 'res', encoded,
  'hr', bool01(hold_released), 'he', bool01(hold_expired), 'ol', bool01(over_limit),
  'mid', month_id, 'cms', completed_ms, 'rms', requested_ms, 'dt', document_type,
  'att', encode_hold(requests_as_parts))
redis.call('PEXPIRE', record_key, record_ttl)
index_record(index_key, request_id, tonumber(requested_ms), index_cutoff, index_cap)
return {'OK', '0', final_status, bool01(hold_released), bool01(hold_expired),
  bool01(over_limit), month_id, completed_ms, encoded, expired}
