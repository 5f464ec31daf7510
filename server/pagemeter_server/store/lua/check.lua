-- check.lua: CheckQuota. Decides all requested metrics together and, when every
-- one admits its units and a hold is asked for, reserves them for request_id.
--
-- KEYS[1] plan      pm:{org}:plan       hash {json, version, updated_ms}
-- KEYS[2] holds     pm:{org}:holds      zset request_id -> hold expiry (ms)
-- KEYS[3] holddata  pm:{org}:holddata   hash request_id -> "metric:units:prepaid;..."
-- KEYS[4] held      pm:{org}:held       hash h:<metric> held units, hp:<metric> held prepaid
-- KEYS[5] credits   pm:{org}:credits    hash of credit grants (see _lib.lua)
-- KEYS[6] month     pm:{org}:u:<YYYY-MM> hash c:<metric> committed, pp:<metric> prepaid used,
--                   ro:<metric> drawn from the rollover, rv:<metric> rollover voided
-- KEYS[7] life      pm:{org}:u:lifetime  hash c:<metric> for PERIOD_NONE metrics
-- KEYS[8] rate      pm:{org}:rate       GCRA theoretical arrival time (ms)
-- KEYS[9] record    pm:{org}:r:<request_id> hash (the job's record; touched only with a hold)
-- KEYS[10] index    pm:{org}:recs       zset request_id -> requested-at (ms), with a hold
-- KEYS[11..14]      the windows that contain now_ms (read only; see decide_windows):
--   pm:{org}:w:minute:<epoch minute>, pm:{org}:w:hour:<epoch hour>,
--   pm:{org}:d:<YYYY-MM-DD> (the day hash), pm:{org}:w:week:<Monday YYYY-MM-DD>
-- KEYS[15] previous pm:{org}:u:<period id> of the period before KEYS[6] (rollover)
-- KEYS[16] planlog  pm:{org}:planlog  zset version -> updated_ms (rollover)
-- KEYS[17] planver  pm:{org}:planver  hash version -> plan JSON (rollover)
-- KEYS[18] events   pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[19] evstate  pm:{org}:evstate  hash: the events' sequence (_lib.lua, emit)
--
-- ARGV[1] now_ms
-- ARGV[2] timezone the server assumed when it chose the month key
-- ARGV[3] service default timezone (used when the org has no plan)
-- ARGV[4] hold: '1' to reserve the units when allowed, '0' to only decide
-- ARGV[5] hold expiry (ms)
-- ARGV[6] request fingerprint (idempotency of holds)
-- ARGV[7] record TTL after the hold's expiry (ms)
-- ARGV[8] request_id ('' without a hold)
-- ARGV[9] records index cutoff (ms): entries requested earlier leave the index
-- ARGV[10] records index cap (entries)
-- ARGV[11] the bounds of the period of KEYS[6], "<period id>|<start_ms>|<end_ms>|
--         <start_ms of the period before>" (rollover; _lib.lua, rollover_period)
-- ARGV[12] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
-- ARGV[13] metric count N, then ARGV[14..] N pairs: metric, units
--
-- Returns one of:
--   {'STALE_TZ', plan_timezone}         the server must recompute the month and retry
--   {'NO_PLAN'}                          the organization has no plan (nothing changed)
--   {'RATE_LIMITED', retry_after_ms}     over the org's CheckQuota rate (nothing changed)
--   {'REUSED', status}                   request_id belongs to another job (nothing changed)
--   {'OK', allowed, held, hold_expiry_ms, duplicate, rows, expired, failure_policy}
-- Events: hold.placed when it holds; hold.expired for each hold it finds expired.
-- rows: one per metric, sorted by name, written by check_row (the columns of
--   CHECK_COLUMNS in store/replies.py): metric, allowed, reason, requested,
--   committed, held, quota|'', hard_limit|'', overage_allowed, max_admissible|'',
--   remaining|'', included, prepaid, overage, overage_price, prepaid_available,
--   period ('M' or 'N'), windows (see decide_windows), denied_by (a window kind|''),
--   would_deny (the reason a shadow limit would deny with|''), would_deny_window.
-- expired: units of other jobs' holds found expired by this call, "metric:units:0;...".
-- failure_policy: the plan's store failure policy ('open', 'closed' or '' for the
--   service default), which the server remembers for when Redis is unreachable.
-- Reasons: the REASON_* codes of DecisionReason (WITHIN_QUOTA, PREPAID, OVERAGE,
--   QUOTA_EXCEEDED, HARD_LIMIT_EXCEEDED, SPEND_CAP_REACHED, WINDOW_LIMIT_EXCEEDED,
--   UNKNOWN_METRIC).

local plan_key, holds_key, holddata_key, held_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local credits_key, month_key, life_key, rate_key, record_key, index_key =
  KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local now = tonumber(ARGV[1])
local want_hold = ARGV[4] == '1'
local hold_expiry = tonumber(ARGV[5])
local fingerprint = ARGV[6]
local record_ttl = tonumber(ARGV[7])
local request_id = ARGV[8]
local index_cutoff = tonumber(ARGV[9])
local index_cap = tonumber(ARGV[10])
local count = tonumber(ARGV[13])
assert(#KEYS == 19 and #ARGV == 13 + 2 * count, 'check.lua: wrong number of KEYS or ARGV')
local events = event_sink(KEYS[18], KEYS[19], ARGV[12])
local window_keys = {minute = KEYS[11], hour = KEYS[12], day = KEYS[13], week = KEYS[14]}
local billing = rollover_period(month_key, KEYS[15], plan_key, KEYS[16], KEYS[17], ARGV[11])

local plan = load_plan(plan_key)
local stale = stale_timezone(plan, ARGV[2], ARGV[3])
if stale then
  return stale
end
if not plan then
  return {'NO_PLAN'}
end

-- A retried CheckQuota of a job that already holds its units gets the first answer.
if want_hold then
  local existing = redis.call('HMGET', record_key, 'st', 'cfp', 'cres', 'exp')
  if existing[1] then
    local live = existing[1] == 'held' and tonumber(existing[4]) > now
    if live and existing[2] == fingerprint then
      return {'OK', '1', '1', existing[4], '1', existing[3], '', plan.store_failure_policy or ''}
    end
    local status = existing[1]
    if status == 'held' and not live then
      status = 'expired'
    end
    return {'REUSED', status}
  end
end

-- Rate limit (GCRA): one token per call, a burst of `burst` calls.
local rate = tonumber(plan.rate_per_second or 0)
if rate > 0 then
  local burst = tonumber(plan.burst or 0)
  -- The plan's burst; unset (0) means one second's worth of calls.
  local wait = gcra(rate_key, now, rate, burst > 0 and burst or rate)
  if wait then
    return {'RATE_LIMITED', fmt(wait)}
  end
end

local expired = purge_expired_holds(holds_key, holddata_key, held_key, now, events)

local requests = {}
for i = 1, count do
  requests[i] = {ARGV[12 + 2 * i], tonumber(ARGV[13 + 2 * i])}
end
table.sort(requests, function(a, b) return a[1] < b[1] end)

local rows, hold_parts = {}, {}
local all_allowed = true
for i, req in ipairs(requests) do
  local metric, n = req[1], req[2]
  local limits = plan.metrics[metric]
  if not limits then
    all_allowed = false
    rows[i] = {
      metric = metric, allowed = false, reason = REASON_UNKNOWN_METRIC, requested = n,
      committed = 0, held = 0, overage_allowed = false, max_admissible = 0, remaining = 0,
      included = 0, prepaid = 0, overage = 0, overage_price = '0', prepaid_available = 0,
      lifetime = false, windows = '', denied_by = '', would_deny = nil, would_deny_window = '',
    }
  else
    local bucket, period = bucket_for(limits, month_key, life_key)
    local committed = int(redis.call('HGET', bucket, 'c:' .. metric))
    local held = int(redis.call('HGET', held_key, 'h:' .. metric))
    local held_prepaid = int(redis.call('HGET', held_key, 'hp:' .. metric))
    add_rollover(credits_key, billing, metric, limits, now)
    local balance = credit_balance(credits_key, metric, now)
    local prepaid_available = math.max(0, balance - held_prepaid)
    local used = committed + held
    local quota, hard = limits.contract_quota, limits.hard_limit

    -- The most units admissible now: the partial-admission hint.
    local cap = nil
    if hard then
      cap = math.max(0, hard - used)
    end
    if quota and not limits.overage_allowed then
      local within = math.max(0, quota - used) + prepaid_available
      if cap == nil or within < cap then
        cap = within
      end
    end
    -- The spend cap, in overage units (overage_unit_cap): the overage the period
    -- has taken already, committed and held, is what lies past the quota and was
    -- not paid from prepaid credits.
    local overage_room = nil
    if quota and limits.overage_unit_cap then
      local month_prepaid = int(redis.call('HGET', bucket, 'pp:' .. metric))
      local taken = math.max(0, used - quota - month_prepaid - held_prepaid)
      overage_room = math.max(0, limits.overage_unit_cap - taken)
      local within = math.max(0, quota - used) + prepaid_available + overage_room
      if cap == nil or within < cap then
        cap = within
      end
    end
    local windows, denied_by, window_cap, shadow_window = decide_windows(limits.windows,
      window_keys, metric, held, n)
    if window_cap and (cap == nil or window_cap < cap) then
      cap = window_cap
    end

    -- Split: contract quota first, then prepaid credits, then overage.
    local included = n
    if quota then
      included = math.min(n, math.max(0, quota - used))
    end
    local beyond = n - included
    local prepaid = math.min(beyond, prepaid_available)
    local overage = beyond - prepaid

    local reason
    if hard and used + n > hard then
      reason = REASON_HARD_LIMIT_EXCEEDED
    elseif overage > 0 and not limits.overage_allowed then
      reason = REASON_QUOTA_EXCEEDED
    elseif overage_room and overage > overage_room then
      reason = REASON_SPEND_CAP_REACHED
    elseif overage > 0 then
      reason = REASON_OVERAGE
    elseif prepaid > 0 then
      reason = REASON_PREPAID
    else
      reason = REASON_WITHIN_QUOTA
    end
    -- The period's own limits speak first: waiting for a window does not help them.
    if reason <= REASON_OVERAGE and denied_by ~= '' then
      reason = REASON_WINDOW_LIMIT_EXCEEDED
    end
    local allowed = reason <= REASON_OVERAGE
    -- Shadow limits: what they would answer, in the same order as the real ones.
    local would_deny, would_deny_window = nil, ''
    local shadow_hard = limits.shadow_hard_limit
    if shadow_hard and used + n > shadow_hard then
      would_deny = REASON_HARD_LIMIT_EXCEEDED
    elseif shadow_window ~= '' then
      would_deny, would_deny_window = REASON_WINDOW_LIMIT_EXCEEDED, shadow_window
    end
    all_allowed = all_allowed and allowed

    local remaining = cap
    if cap and allowed then
      remaining = cap - n
    end
    rows[i] = {
      metric = metric, allowed = allowed, reason = reason, requested = n,
      committed = committed, held = held, contract_quota = quota, hard_limit = hard,
      overage_allowed = limits.overage_allowed, max_admissible = cap, remaining = remaining,
      included = included, prepaid = prepaid, overage = overage,
      overage_price = limits.overage_price or '0', prepaid_available = prepaid_available,
      lifetime = period == 'N', windows = windows, denied_by = denied_by,
      would_deny = would_deny, would_deny_window = would_deny_window,
    }
    hold_parts[#hold_parts + 1] = {metric, n, prepaid}
  end
end

local encoded = encode_rows(rows, check_row)
if not (all_allowed and want_hold) then
  return {'OK', bool01(all_allowed), '0', '0', '0', encoded, expired, plan.store_failure_policy or ''}
end

for _, p in ipairs(hold_parts) do
  if p[2] > 0 then
    redis.call('HINCRBY', held_key, 'h:' .. p[1], p[2])
  end
  if p[3] > 0 then
    redis.call('HINCRBY', held_key, 'hp:' .. p[1], p[3])
  end
end
redis.call('HSET', holddata_key, request_id, encode_hold(hold_parts))
redis.call('ZADD', holds_key, hold_expiry, request_id)
redis.call('HSET', record_key, 'st', 'held', 'cfp', fingerprint, 'cres', encoded,
  'exp', fmt(hold_expiry), 'rms', fmt(now), 'hold', encode_hold(hold_parts))
redis.call('PEXPIRE', record_key, hold_expiry - now + record_ttl)
index_record(index_key, request_id, now, index_cutoff, index_cap, hold_expiry - now + record_ttl)
emit(events, now, 'hold.placed', {request_id = request_id, expires_at = fmt(hold_expiry),
  metrics = hold_event_metrics(hold_parts)})
return {'OK', '1', '1', fmt(hold_expiry), '0', encoded, expired, plan.store_failure_policy or ''}
