-- record.lua: RecordUsage. Commits a finished job's units exactly once per
-- request_id, frees the job's hold, and says which pool paid for each unit.
--
-- KEYS[1] plan      pm:{org}:plan
-- KEYS[2] holds     pm:{org}:holds
-- KEYS[3] holddata  pm:{org}:holddata
-- KEYS[4] held      pm:{org}:held
-- KEYS[5] credits   pm:{org}:credits   credit grants (see _lib.lua)
-- KEYS[6] month     pm:{org}:u:<YYYY-MM>   the month of completed_at in the plan's timezone
-- KEYS[7] life      pm:{org}:u:lifetime
-- KEYS[8] record    pm:{org}:r:<request_id>
-- KEYS[9] day       pm:{org}:d:<YYYY-MM-DD>  the day of completed_at in the plan's timezone
-- KEYS[10] index    pm:{org}:recs            zset request_id -> requested-at (ms)
-- KEYS[11] unplanned pm:{org}:unplanned     zset metric not in the plan -> last recorded (ms)
-- KEYS[12] doctypes pm:{org}:doctypes       zset document type -> last recorded (ms)
-- KEYS[13..15]      the minute, hour and week windows that contain completed_at
--   (pm:{org}:w:minute:<epoch minute>, w:hour:<epoch hour>, w:week:<Monday>); the
--   day window is the day hash, KEYS[9]
-- KEYS[16] previous pm:{org}:u:<period id> of the period before KEYS[6] (rollover)
-- KEYS[17] planlog  pm:{org}:planlog  zset version -> updated_ms (rollover)
-- KEYS[18] planver  pm:{org}:planver  hash version -> plan JSON (rollover)
-- KEYS[19] events   pm:{org}:events   stream: the org's events (_lib.lua, emit)
-- KEYS[20] evstate  pm:{org}:evstate  hash: the events' sequence (_lib.lua, emit)
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
-- ARGV[16] most metrics not in the plan the org may use within the retention
-- ARGV[17] most document types the org's statistics tell apart within the retention
-- ARGV[18] name registry cutoff (ms): names last recorded before it are forgotten
--          (the counters that named them have expired by then)
-- ARGV[19..21] when the windows of KEYS[13..15] end (ms on the now_ms clock)
-- ARGV[22] the bounds of the period of KEYS[6], "<period id>|<start_ms>|<end_ms>|
--         <start_ms of the period before>" (rollover; _lib.lua, rollover_period)
-- ARGV[23] events: "<max entries>|<oldest entry id kept>|<retention ms>", '' for none
-- ARGV[24] metric count N, then ARGV[25..] N pairs: metric, units
--
-- Returns one of:
--   {'STALE_TZ', plan_timezone}   the server must recompute the month and retry
--   {'REUSED', status}            request_id was recorded with another payload (nothing changed)
--   {'NEGATIVE', metric}          negative units for a metric that is not PERIOD_NONE (nothing changed)
--   {'TOO_MANY_METRICS', metric, cap}  the record names a metric not in the plan and the
--                                 org already uses `cap` such metrics (nothing changed)
--   {'OK', duplicate, status, hold_released, hold_expired, over_limit, month_id,
--    completed_ms, rows, expired, folded}
-- expired: units of holds found expired by this call, "metric:units:0;...".
-- folded: '1' when the job's document type counted as '_other' (a duplicate: '0').
-- Events: usage.recorded for a new record (with its split into included, prepaid
--   and overage units per metric, and how the job's hold ended); hold.expired for
--   each other hold it finds expired; threshold.crossed / threshold.resolved for
--   the thresholds of the metrics it moved (_lib.lua, watch_usage and
--   watch_credits). A duplicate writes none.
-- status is 'completed' or 'failed'. rows: one per metric, sorted by name,
--   written by record_row (the columns of RECORD_COLUMNS in store/replies.py):
--   metric, units, included, prepaid, overage, committed_after, quota|'',
--   hard_limit|'', over_quota, over_hard_limit, overage_not_allowed, period
--   ('M'/'N'), overage_price, planned ('1' when the metric is in the plan), windows
--   (window_part of _lib.lua per window, joined by '/': used is the window's
--   committed units after this record), over_spend_cap.
-- A metric that is not in the plan (or an org without a plan) is still recorded,
-- as a monthly metric with no limits: work that was done is never dropped. But
-- the names are the caller's, so an organization may use at most ARGV[16] of
-- them within the retention (KEYS[11] remembers which): each name costs a field
-- in every month, day and lifetime hash and a row in every usage answer.
--
-- Besides the month, a new record also adds to (all in this one atomic step):
--   the day's hash: c:<m> units, ok / failed jobs, and per document type
--     tc:<type>:<m>, tok:<type>, tfail:<type> (monthly metrics only: lifetime
--     gauges are not usage); the org's statistics tell apart at most ARGV[17]
--     document types within the retention (KEYS[12]), later ones count as
--     '_other' there (the record keeps its own type);
--   the lifetime hash: a:<m>, all successful units ever, for monthly metrics;
--   the records index, by requested-at.
-- A record that only moves PERIOD_NONE gauges is not a job: it adds to no job
-- or day counter. The record keeps the units the job reported ('att'), so the
-- log of a failed job shows what it tried.

local plan_key, holds_key, holddata_key, held_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local credits_key, month_key, life_key, record_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local day_key, index_key, unplanned_key, doctypes_key = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
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
local unplanned_cap = tonumber(ARGV[16])
local doctypes_cap = tonumber(ARGV[17])
local names_cutoff = tonumber(ARGV[18])
local window_keys = {minute = KEYS[13], hour = KEYS[14], day = day_key, week = KEYS[15]}
local window_ends = {minute = tonumber(ARGV[19]), hour = tonumber(ARGV[20]),
  week = tonumber(ARGV[21])}
local count = tonumber(ARGV[24])
assert(#KEYS == 20 and #ARGV == 24 + 2 * count, 'record.lua: wrong number of KEYS or ARGV')
local events = event_sink(KEYS[19], KEYS[20], ARGV[23])
-- A rollover pays for usage of its own period only, while it runs: a late
-- record counted in an earlier period draws on no rollover (add_rollover).
local billing = rollover_period(month_key, KEYS[16], plan_key, KEYS[17], KEYS[18], ARGV[22])

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
    existing[8], '', '0'}
end

local requests = {}
for i = 1, count do
  local metric, n = ARGV[23 + 2 * i], tonumber(ARGV[24 + 2 * i])
  if n < 0 and not (metrics[metric] and metrics[metric].period == 'none') then
    return {'NEGATIVE', metric}
  end
  requests[i] = {metric, n}
end
table.sort(requests, function(a, b) return a[1] < b[1] end)

-- A name is live in a registry when it was recorded since the cutoff.
local function live_in(registry, name)
  local score = redis.call('ZSCORE', registry, name)
  return score and tonumber(score) >= names_cutoff
end

-- Metrics not in the plan: decided before anything is written.
local unplanned = {}
local newcomers = 0
for _, req in ipairs(requests) do
  if not metrics[req[1]] then
    unplanned[#unplanned + 1] = req[1]
    if not live_in(unplanned_key, req[1]) then
      newcomers = newcomers + 1
      if redis.call('ZCOUNT', unplanned_key, names_cutoff, '+inf') + newcomers > unplanned_cap then
        return {'TOO_MANY_METRICS', req[1], fmt(unplanned_cap)}
      end
    end
  end
end

-- Names whose counters have all expired leave the registries (with the
-- all-time total of an unplanned metric, which nothing else would ever drop).
local forgotten = redis.call('ZRANGEBYSCORE', unplanned_key, '-inf', '(' .. fmt(names_cutoff))
if #forgotten > 0 then
  for _, metric in ipairs(forgotten) do
    if not metrics[metric] then
      redis.call('HDEL', life_key, 'a:' .. metric)
    end
  end
  redis.call('ZREMRANGEBYSCORE', unplanned_key, '-inf', '(' .. fmt(names_cutoff))
end
redis.call('ZREMRANGEBYSCORE', doctypes_key, '-inf', '(' .. fmt(names_cutoff))
for _, metric in ipairs(unplanned) do
  redis.call('ZADD', unplanned_key, now, metric)
end
-- The units the job reported, kept with its record even when it failed (a
-- failed job consumes nothing, but its log shows what it tried).
local requests_as_parts = {}
for i, req in ipairs(requests) do
  requests_as_parts[i] = {req[1], req[2], 0}
end

-- Free this job's hold before pricing the units, so its own prepaid
-- reservation is available to it.
local expired = purge_expired_holds(holds_key, holddata_key, held_key, now, events)
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
  local quota, hard = limits.contract_quota, limits.hard_limit
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
      -- Grants are drawn as they stand at the commit (now): one that expired
      -- since the job's hold no longer counts, and its units are priced on.
      add_rollover(credits_key, billing, metric, metrics[metric], now)
      local balance = credit_balance(credits_key, metric, now)
      local reserved = int(redis.call('HGET', held_key, 'hp:' .. metric))
      prepaid = math.min(beyond, math.max(0, balance - reserved))
      if prepaid > 0 then
        draw_credits(credits_key, metric, prepaid, now)
        redis.call('HINCRBY', bucket, 'pp:' .. metric, prepaid)
      end
    end
    overage = beyond - prepaid
    committed = redis.call('HINCRBY', bucket, 'c:' .. metric, n)
    forget_rollover(credits_key, bucket, metric)
  end
  local over_quota = quota ~= nil and committed > quota
  local over_hard = hard ~= nil and committed > hard
  local overage_not_allowed = overage > 0 and not limits.overage_allowed
  -- Past the spend cap: the period's overage (past the quota, not paid from
  -- prepaid credits) is more than the cap allows in units.
  local over_spend_cap = false
  if quota and limits.overage_unit_cap and success then
    local month_prepaid = int(redis.call('HGET', bucket, 'pp:' .. metric))
    over_spend_cap = committed - quota - month_prepaid > limits.overage_unit_cap
  end
  over_limit = over_limit or over_hard or overage_not_allowed or over_spend_cap
  rows[i] = {
    metric = metric, units = n, included = included, prepaid = prepaid, overage = overage,
    committed = committed, contract_quota = quota, hard_limit = hard,
    over_contract_quota = over_quota, over_hard_limit = over_hard,
    overage_not_allowed = overage_not_allowed, lifetime = period == 'N',
    overage_price = limits.overage_price or '0', planned = metrics[metric] ~= nil,
    over_spend_cap = over_spend_cap,
  }
end

-- A job is work on a monthly metric. A record that only moves lifetime gauges
-- (an application created, a template deleted) is not a document job: it is
-- kept as a record but counts in no job or day counter.
local is_job = false
for _, row in ipairs(rows) do
  if not row.lifetime then
    is_job = true
  end
end

local final_status = 'failed'
if success then
  final_status = 'completed'
end

-- The usage.recorded event's fields: the job, and its metric rows as the
-- record keeps them (encoded once, for the reply, the record and the event; no
-- JSON to build: store/events.py reads them into the event's data).
local function recorded_event(encoded_rows)
  local hold = 'none'
  if hold_released then
    hold = 'released'
  elseif hold_expired then
    hold = 'expired'
  end
  return {'rid', request_id, 'st', final_status, 'per', month_id, 'cms', completed_ms,
    'rms', requested_ms, 'dt', document_type, 'hold', hold, 'ol', bool01(over_limit),
    'rows', encoded_rows}
end

local day_type = document_type
if is_job then
  -- The day's counters, for statistics by date and by document type. The
  -- types are the caller's names: past the org's cap they count as '_other'.
  if live_in(doctypes_key, day_type)
      or redis.call('ZCOUNT', doctypes_key, names_cutoff, '+inf') < doctypes_cap then
    redis.call('ZADD', doctypes_key, now, day_type)
  else
    day_type = '_other'
  end
  for _, row in ipairs(rows) do
    local metric, n = row.metric, row.units
    if not row.lifetime and n > 0 then
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
-- The windows that contain completed_at (the day's was counted above). A window
-- that has already ended (a late report) is not added to: it decides nothing
-- any more. Its hash lives a minute past its end, for servers whose clocks lag.
for _, row in ipairs(rows) do
  local windows = (metrics[row.metric] or {}).windows
  local parts = {}
  for i, w in ipairs(windows or {}) do
    local key, ends = window_keys[w.window], window_ends[w.window]
    local used
    if ends and row.units > 0 and ends > now then
      used = redis.call('HINCRBY', key, 'c:' .. row.metric, row.units)
      redis.call('PEXPIRE', key, ends - now + 60000)
    else
      used = int(redis.call('HGET', key, 'c:' .. row.metric))
    end
    local exceeded = used > w.limit
    over_limit = over_limit or (exceeded and not w.soft and not w.shadow)
    parts[i] = window_part(w, used, exceeded)
  end
  row.windows = table.concat(parts, '/')
end

-- Relative to the call's clock, not Redis's, so the expiry follows the same time
-- as the rules (tests drive that clock).
redis.call('PEXPIRE', month_key, math.max(1, month_expire_at - now))

local encoded = encode_rows(rows, record_row)
local folded = bool01(is_job and day_type ~= document_type)
redis.call('HSET', record_key, 'st', final_status, 'fp', fingerprint, 'res', encoded,
  'hr', bool01(hold_released), 'he', bool01(hold_expired), 'ol', bool01(over_limit),
  'mid', month_id, 'cms', completed_ms, 'rms', requested_ms, 'dt', document_type,
  'att', encode_hold(requests_as_parts))
redis.call('PEXPIRE', record_key, record_ttl)
index_record(index_key, request_id, tonumber(requested_ms), index_cutoff, index_cap, record_ttl)
-- The name registries live as long as the counters they name. Without a plan
-- the lifetime totals are only unplanned metrics' totals: they go too, so that
-- an organization id nobody configured leaves nothing behind for good.
emit_fields(events, now, 'usage.recorded', recorded_event(encoded))
-- The thresholds of what this record moved: the period's while it runs (a late
-- record's period is over), and the credits it drew on.
if events and success then
  local running = nil
  for _, row in ipairs(rows) do
    local limits = metrics[row.metric]
    if limits and row.units ~= 0 then
      local scope = 'lifetime'
      if not row.lifetime then
        if running == nil then
          running = period_runs(billing, now)
        end
        scope = running and month_id or nil
      end
      if scope then
        local prepaid_used = 0
        if limits.overage_unit_cap then
          prepaid_used = int(redis.call('HGET', month_key, 'pp:' .. row.metric))
        end
        watch_usage(events, now, row.metric, limits, scope, row.committed, prepaid_used,
          'no_longer_holds', nil, row.units)
      end
      if row.prepaid > 0 then
        watch_credits(events, now, credits_key, row.metric, limits, 'no_longer_holds')
      end
    end
  end
end
local names_ttl = now - names_cutoff
redis.call('PEXPIRE', unplanned_key, names_ttl)
redis.call('PEXPIRE', doctypes_key, names_ttl)
if not plan then
  redis.call('PEXPIRE', life_key, names_ttl)
end
return {'OK', '0', final_status, bool01(hold_released), bool01(hold_expired),
  bool01(over_limit), month_id, completed_ms, encoded, expired, folded}
