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
--
-- Generated from server/pagemeter_server/store/lua/record.lua by `make scripts`; do not edit.
-- Built with server/pagemeter_server/store/lua/_lib.lua, the DecisionReason
-- codes of protos/pagemeter/v1/quota.proto and the row columns declared in
-- server/pagemeter_server/store/replies.py.

-- Shared helpers, put into every pagemeter script by `make scripts`
-- (store/build_scripts.py writes the scripts Redis runs into lua/built/, since
-- Redis scripts cannot include each other). Defines no KEYS or ARGV of its own
-- and returns nothing. The generated declarations follow it in each script: the
-- REASON_* codes of DecisionReason and the row writers check_row and record_row.
--
-- Conventions of all scripts:
-- * Every key of an organization carries its `{org_id}` hash tag, so a script
--   only ever touches one cluster slot.
-- * Units are integers well inside 2^53 (the server caps each amount at 10^9), so
--   Lua's doubles hold them exactly. Numbers are turned into strings with
--   string.format('%d') because tostring() would switch to exponent notation.
-- * Money never appears in Lua: prices travel as the decimal strings the plan
--   stores and the server multiplies them with Python's Decimal.
-- * The clock is ARGV (now_ms), never the script's own, so tests control time.

local function fmt(n)
  return string.format('%d', n)
end

local function int(v)
  if v == false or v == nil or v == '' then
    return 0
  end
  return tonumber(v)
end

local function opt(n)
  if n == nil then
    return ''
  end
  return fmt(n)
end

local function bool01(b)
  if b then
    return '1'
  end
  return '0'
end

-- A stored plan document (domain/plans.py, PlanDoc), read into its schema 2
-- names: timezone, rate_per_second, burst, store_failure_policy, metrics (each
-- with period 'monthly' | 'none', contract_quota, hard_limit, overage_allowed,
-- price, overage_price; a missing limit is nil). A document of schema 1 (terse
-- keys, no schema key), written until the deployment's plans are migrated, is
-- read into the same names, with the defaults its readers assumed.
local function terms_from_schema_1(t)
  return {
    period = (t.per == 'N') and 'none' or 'monthly',
    contract_quota = t.q, hard_limit = t.h, overage_allowed = t.o,
    price = t.p, overage_price = t.op,
  }
end

local function plan_doc(raw)
  local doc = cjson.decode(raw)
  if doc.schema == 2 then
    return doc
  end
  -- A metric's schema 1 terms are converted when a script first asks for them:
  -- a call names a few of its plan's metrics, and no script walks them all.
  local schema_1_metrics = doc.metrics
  local metrics = setmetatable({}, {__index = function(converted, metric)
    local terms = schema_1_metrics[metric]
    if terms == nil then
      return nil
    end
    terms = terms_from_schema_1(terms)
    rawset(converted, metric, terms)
    return terms
  end})
  return {
    schema = 2, name = doc.name, timezone = doc.tz, rate_per_second = doc.rate,
    burst = doc.burst, processing_priority = doc.prio, support_level = doc.support,
    currency = doc.currency, store_failure_policy = doc.sfp, metrics = metrics,
    schema_1_metrics = schema_1_metrics,
  }
end

-- The names of a plan's metrics, sorted (pairs over a schema 1 plan's metrics
-- sees only those converted so far).
local function metric_names(plan)
  local names = {}
  for metric, _ in pairs(plan.schema_1_metrics or plan.metrics) do
    names[#names + 1] = metric
  end
  table.sort(names)
  return names
end

-- Plan: a hash {json, version, updated_ms}; json is written only by the server.
-- Read and decoded once per script call: a batch's items all read their
-- organization's plan, and no script that reads a plan changes it. The tables
-- returned are shared by those items, so they are never modified.
local plans_read = {}
local function load_plan(plan_key)
  local plan = plans_read[plan_key]
  if plan == nil then
    local raw = redis.call('HGET', plan_key, 'json')
    plan = raw and plan_doc(raw) or false
    plans_read[plan_key] = plan
  end
  return plan or nil
end

-- The calendar the scripts must agree on with the server: the plan's timezone,
-- followed by '|' and its billing calendar when it has one (domain/periods.py,
-- the calendar token), or the service default when the organization has no plan.
local function plan_timezone(plan, default_tz)
  if plan and plan.timezone and plan.timezone ~= '' then
    if plan.calendar and plan.calendar ~= '' then
      return plan.timezone .. '|' .. plan.calendar
    end
    return plan.timezone
  end
  return default_tz
end

-- The month key a script was given is only right if the server assumed the
-- plan's timezone; otherwise the script must answer this and write nothing.
local function stale_timezone(plan, assumed_tz, default_tz)
  local tz = plan_timezone(plan, default_tz)
  if tz ~= assumed_tz then
    return {'STALE_TZ', tz}
  end
  return nil
end

-- Credits: pm:{org}:credits, a hash. Field "g:<grant_id>" is a credit grant,
-- "metric|remaining|effective_ms|expires_ms|priority|units|state" (expires_ms
-- 0: never; state A active, V voided). A field named after a metric is a
-- prepaid balance of an earlier release: credits that never expire, read as a
-- grant of priority 50 (`pagemeter-server migrate-plans` turns each into the
-- grant "prepaid-<metric>"). A grant is live at `now` when it has units left,
-- is effective and not expired; the prepaid balance is what live grants have.
-- Read once per script call; draw_credits keeps the table in step with what it
-- writes, so a batch's later items see its earlier draws.
local LEGACY_PRIORITY = 50
local credits_read = {}
local function load_credits(credits_key)
  local by_metric = credits_read[credits_key]
  if by_metric == nil then
    by_metric = {}
    local raw = redis.call('HGETALL', credits_key)
    for i = 1, #raw, 2 do
      local field, value = raw[i], raw[i + 1]
      local grant
      if string.sub(field, 1, 2) == 'g:' then
        local metric, remaining, effective, expires, priority, units, state = string.match(
          value, '^([^|]+)|(%-?%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%a)$')
        if metric then
          grant = {id = string.sub(field, 3), metric = metric, remaining = tonumber(remaining),
            effective = tonumber(effective), expires = tonumber(expires),
            priority = tonumber(priority), units = tonumber(units), state = state}
        end
      else
        grant = {id = '', metric = field, legacy = true, remaining = tonumber(value) or 0,
          effective = 0, expires = 0, priority = LEGACY_PRIORITY, state = 'A'}
      end
      if grant then
        local list = by_metric[grant.metric]
        if not list then
          list = {}
          by_metric[grant.metric] = list
        end
        list[#list + 1] = grant
      end
    end
    credits_read[credits_key] = by_metric
  end
  return by_metric
end

-- A grant that can still count: not voided, units left, not expired (it may
-- not be effective yet). Live: one that counts now.
local function grant_can_count(grant, now)
  return grant.state == 'A' and grant.remaining > 0 and (grant.expires == 0 or now < grant.expires)
end

local function grant_live(grant, now)
  return grant_can_count(grant, now) and grant.effective <= now
end

-- The grant "prepaid-<metric>" a balance of an earlier release is read as,
-- empty: the caller gives it the balance's units.
local function prepaid_grant(metric)
  return {id = 'prepaid-' .. metric, metric = metric, remaining = 0, effective = 0, expires = 0,
    priority = LEGACY_PRIORITY, units = 0, state = 'A'}
end

local function credit_balance(credits_key, metric, now)
  local total = 0
  for _, grant in ipairs(load_credits(credits_key)[metric] or {}) do
    if grant_live(grant, now) then
      total = total + grant.remaining
    end
  end
  return total
end

local function encode_grant(grant)
  return grant.metric .. '|' .. fmt(grant.remaining) .. '|' .. fmt(grant.effective) .. '|'
    .. fmt(grant.expires) .. '|' .. fmt(grant.priority) .. '|' .. fmt(grant.units) .. '|'
    .. grant.state
end

-- Lower priority first, then the earliest expiry (never last), then the
-- earliest effective, then the grant id: a total order, the same everywhere.
local function drawn_before(a, b)
  if a.priority ~= b.priority then
    return a.priority < b.priority
  end
  local a_end = a.expires == 0 and math.huge or a.expires
  local b_end = b.expires == 0 and math.huge or b.expires
  if a_end ~= b_end then
    return a_end < b_end
  end
  if a.effective ~= b.effective then
    return a.effective < b.effective
  end
  return a.id < b.id
end

-- Rollover (decision 42): a metric whose plan sets rollover_percent takes into
-- each billing period part of the contract quota the previous period left
-- unused, as the grant "rollover-<period id>-<metric>": floor(unused x percent
-- / 100) units, at most rollover_cap, effective for the period, expiring at its
-- end, of the default priority. The grant is not stored: it is worked out from
-- the previous period's committed units each time it is read, so a correction
-- of that period or a late record counted in it changes what the rollover is
-- worth. The period's hash keeps what was drawn from it (ro:<metric>) and
-- whether it was voided (rv:<metric>).
--   unused: the previous period's contract quota, in the terms it ended with
--     (the plan version set before this period began), less its committed
--     units; nothing when the metric had no quota then.
--   Only a period wholly under a plan rolls over: the organization's first plan
--     must predate the previous period's start.
--   percent and cap are the current plan's: whether a period takes a rollover
--     in is up to the plan in effect.
-- A rollover pays only for usage counted in its own period, while that period
-- runs. `period` is the context the caller gives: the period's hash, the
-- previous period's, the plan keys, and its bounds as one argument,
-- "<period id>|<start_ms>|<end_ms>|<previous period's start_ms>", read only
-- when a metric rolls quota over (every check and record carries it).
local ROLLOVER_PRIORITY = 50

local function rollover_period(month_key, previous_key, plan_key, planlog_key, planver_key,
    bounds)
  return {month_key = month_key, previous_key = previous_key, plan_key = plan_key,
    planlog_key = planlog_key, planver_key = planver_key, bounds = bounds}
end

-- Whether the period runs at `now` (reading its bounds the first time).
local function period_runs(period, now)
  if not period.start_ms then
    local id, start_ms, end_ms, previous_start_ms = string.match(period.bounds,
      '^([^|]+)|(%d+)|(%d+)|(%d+)$')
    period.id, period.start_ms, period.end_ms = id, tonumber(start_ms), tonumber(end_ms)
    period.previous_start_ms = tonumber(previous_start_ms)
  end
  return period.start_ms <= now and now < period.end_ms
end

local function plan_set_ms(period)
  return int(redis.call('HGET', period.plan_key, 'updated_ms'))
end

-- The metric's contract quota in the terms the previous period ended with.
local function previous_quota(period, metric, current_limits, updated_ms)
  if updated_ms < period.start_ms then
    return current_limits.contract_quota
  end
  local ids = redis.call('ZREVRANGEBYSCORE', period.planlog_key, '(' .. fmt(period.start_ms),
    '-inf', 'LIMIT', 0, 1)
  if #ids == 0 then
    return nil
  end
  local raw = redis.call('HGET', period.planver_key, ids[1])
  if not raw then
    return nil
  end
  local terms = plan_doc(raw).metrics[metric]
  if not terms or terms.period == 'none' then
    return nil
  end
  return terms.contract_quota
end

-- Whether the organization had a plan when the previous period began: the
-- plan's created_ms (set_plan.lua), else the oldest version its log keeps.
local function planned_since(period, updated_ms)
  if updated_ms > 0 and updated_ms <= period.previous_start_ms then
    return true
  end
  local created = redis.call('HGET', period.plan_key, 'created_ms')
  if created then
    return tonumber(created) <= period.previous_start_ms
  end
  local first = redis.call('ZRANGE', period.planlog_key, 0, 0, 'WITHSCORES')
  return #first == 2 and tonumber(first[2]) <= period.previous_start_ms
end

local function rollover_grant(period, metric, limits)
  local percent = limits.rollover_percent
  if not percent or limits.period == 'none' then
    return nil
  end
  local updated_ms = plan_set_ms(period)
  if not planned_since(period, updated_ms) then
    return nil
  end
  local quota = previous_quota(period, metric, limits, updated_ms)
  if not quota then
    return nil
  end
  local unused = math.max(0, quota - int(redis.call('HGET', period.previous_key, 'c:' .. metric)))
  local units = math.floor(unused * percent / 100)
  if limits.rollover_cap and limits.rollover_cap < units then
    units = limits.rollover_cap
  end
  if units <= 0 then
    return nil
  end
  local state = redis.call('HMGET', period.month_key, 'ro:' .. metric, 'rv:' .. metric)
  local remaining = math.max(0, units - int(state[1]))
  local voided = state[2] == '1'
  if voided then
    remaining = 0
  end
  return {id = 'rollover-' .. period.id .. '-' .. metric, metric = metric, remaining = remaining,
    effective = period.start_ms, expires = period.end_ms, priority = ROLLOVER_PRIORITY,
    units = units, state = voided and 'V' or 'A', rollover = period.month_key,
    measured_on = period.previous_key}
end

-- Put the metric's rollover grant, when it has one, among the credits the
-- script read (once per call: draw_credits keeps it in step afterwards). Only
-- while the period runs: a rollover pays for nothing once its period is over.
local rollovers_added = {}
local function add_rollover(credits_key, period, metric, limits, now)
  -- Checked first: the common metric has no rollover, and this is every call's path.
  if not (limits and limits.rollover_percent) or not period_runs(period, now) then
    return
  end
  local seen = credits_key .. '|' .. period.id .. '|' .. metric
  if rollovers_added[seen] then
    return
  end
  rollovers_added[seen] = true
  local grant = rollover_grant(period, metric, limits)
  if grant then
    grant.added_as = seen
    local by_metric = load_credits(credits_key)
    by_metric[metric] = by_metric[metric] or {}
    table.insert(by_metric[metric], grant)
  end
end

-- Units committed in `bucket` change what a rollover measured on it is worth:
-- a later item of the same batch works it out again (a late record counted in
-- the previous period shrinks the current period's rollover).
local function forget_rollover(credits_key, bucket, metric)
  local by_metric = credits_read[credits_key]
  local list = by_metric and by_metric[metric]
  if not list then
    return
  end
  for i = #list, 1, -1 do
    if list[i].measured_on == bucket then
      rollovers_added[list[i].added_as] = nil
      table.remove(list, i)
    end
  end
end

-- The rollover grants of a plan's metrics in the period, as the fields of a
-- credits hash would hold them ("g:<id>", value; flat), for the readers.
local function rollover_fields(plan, period, now)
  local fields = {}
  if not plan or not period_runs(period, now) then
    return fields
  end
  for metric, limits in pairs(plan.metrics) do
    local grant = limits.rollover_percent and rollover_grant(period, metric, limits)
    if grant then
      fields[#fields + 1] = 'g:' .. grant.id
      fields[#fields + 1] = encode_grant(grant)
    end
  end
  return fields
end

-- Take `amount` units (at most the balance) from the metric's live grants, in
-- draw order, and write what each has left.
local function draw_credits(credits_key, metric, amount, now)
  local live = {}
  for _, grant in ipairs(load_credits(credits_key)[metric] or {}) do
    if grant_live(grant, now) then
      live[#live + 1] = grant
    end
  end
  table.sort(live, drawn_before)
  for _, grant in ipairs(live) do
    if amount <= 0 then
      break
    end
    local take = math.min(amount, grant.remaining)
    grant.remaining = grant.remaining - take
    amount = amount - take
    if grant.legacy then
      redis.call('HINCRBY', credits_key, metric, -take)
    elseif grant.rollover then
      redis.call('HINCRBY', grant.rollover, 'ro:' .. metric, take)
    else
      redis.call('HSET', credits_key, 'g:' .. grant.id, encode_grant(grant))
    end
  end
end

-- The organization's event stream (docs/events.md): every script that changes
-- state appends the events of its change here, in the same atomic step, so an
-- event exists exactly when its change does. An entry holds its per-org
-- sequence `seq` (the `seq` field of the org's event state hash), `type`, `at`
-- (the rules' clock) and `data` (a JSON object whose numbers are written as
-- strings: Lua's JSON encoder keeps 14 digits; the server reads them back as
-- integers). The entry id (Redis's clock) is the event's stable id.
-- spec is "<max entries>|<oldest entry id kept>|<retention ms>" as the server
-- computes it (on its clock, which the entry ids follow), or '' when events are
-- off. The stream lives the retention past its last event; the state hash
-- (sequence, thresholds crossed) a year longer, so the sequence goes on.
local EVENT_STATE_GRACE_MS = 366 * 86400000
-- Entries older than the retention leave at every this many events (a stream
-- keeps at most this many more than its retention).
local EVENT_TRIM_EVERY = 100

local function event_sink(stream_key, state_key, spec)
  local cap, minid, ttl = string.match(spec, '^(%d+)|(%d+)|(%d+)$')
  if not cap then
    return nil
  end
  return {stream = stream_key, state = state_key, cap = cap, minid = minid,
    ttl = tonumber(ttl), kept = false}
end

-- An event whose data is `fields`, a flat list of names and values written as
-- they are (usage.recorded: the figures the script has already encoded; the
-- server reads them as store/events.py says).
local function emit_fields(sink, now, kind, fields)
  if not sink then
    return
  end
  local seq = redis.call('HINCRBY', sink.state, 'seq', 1)
  redis.call('XADD', sink.stream, 'MAXLEN', '~', sink.cap, '*',
    'seq', fmt(seq), 'type', kind, 'at', fmt(now), unpack(fields))
  if seq % EVENT_TRIM_EVERY == 0 then
    -- By age, now and then: approximate trimming removes only whole nodes.
    redis.call('XTRIM', sink.stream, 'MINID', '~', sink.minid)
  end
  if not sink.kept then
    redis.call('PEXPIRE', sink.stream, sink.ttl)
    redis.call('PEXPIRE', sink.state, sink.ttl + EVENT_STATE_GRACE_MS)
    sink.kept = true
  end
end

-- An event whose data is the JSON object `data`.
local function emit(sink, now, kind, data)
  if sink then
    emit_fields(sink, now, kind, {'data', cjson.encode(data)})
  end
end

-- Hold data: "metric:units:prepaid_units;..." per request_id.
local function decode_hold(s)
  local parts = {}
  for metric, units, prepaid in string.gmatch(s, '([^:;]+):(%-?%d+):(%-?%d+)') do
    parts[#parts + 1] = {metric, tonumber(units), tonumber(prepaid)}
  end
  return parts
end

local function encode_hold(parts)
  local out = {}
  for i, p in ipairs(parts) do
    out[i] = p[1] .. ':' .. fmt(p[2]) .. ':' .. fmt(p[3])
  end
  return table.concat(out, ';')
end

-- Notification thresholds (docs/events.md, thresholds): threshold.crossed the
-- first time a threshold holds, threshold.resolved when it no longer does. The
-- org's event state hash keeps, per threshold crossed, field
-- "a:<metric>:<threshold>" -> the scope it was crossed in: the period id for the
-- period's thresholds (one crossing per period), '-' for the credit ones. A
-- threshold crossed in a period that is over resolves ("period_ended") the next
-- time it is watched. Thresholds are watched where the figures change: record
-- (its period, while it runs), correction, credit grant and void, and the
-- sweep (alerts.lua: after SetPlan, and periodically).
-- The plan's percentages, or these (domain/plans.py, DEFAULT_ALERT_PERCENTS).
local DEFAULT_ALERT_PERCENTS = {80, 100}

-- The units at which a threshold of `percent` % of `limit` holds: the smallest
-- whole number at or past the percentage.
local function level_of(limit, percent)
  return math.ceil(limit * percent / 100)
end

-- The period thresholds of a metric: name, kind, percent, limit, level.
local function usage_thresholds(limits)
  local out = {}
  local alerts = limits.alerts
  local function add(kind, percents, limit)
    for _, p in ipairs(percents) do
      out[#out + 1] = {name = kind .. ':' .. fmt(p), kind = kind, percent = p, limit = limit,
        level = level_of(limit, p)}
    end
  end
  if limits.contract_quota then
    add('contract_quota', alerts and alerts.quota or DEFAULT_ALERT_PERCENTS, limits.contract_quota)
  end
  if limits.hard_limit then
    add('hard_limit', alerts and alerts.hard or DEFAULT_ALERT_PERCENTS, limits.hard_limit)
  end
  if limits.contract_quota and limits.overage_unit_cap then
    out[#out + 1] = {name = 'spend_cap', kind = 'spend_cap', limit = limits.overage_unit_cap,
      level = limits.overage_unit_cap}
  end
  return out
end

-- One threshold, in `scope`: crossed when `holds` and not crossed in this
-- scope yet; resolved (with `reason`) when crossed and it no longer holds.
-- `seen`, when given, collects the fields watched (alerts.lua resolves the rest).
local function watch_threshold(sink, now, metric, threshold, holds, scope, figures, reason, seen)
  local field = 'a:' .. metric .. ':' .. threshold.name
  if seen then
    seen[field] = true
  end
  local state = redis.call('HGET', sink.state, field)
  local data = {metric = metric, threshold = threshold.name, kind = threshold.kind,
    percent = threshold.percent and fmt(threshold.percent),
    level = threshold.level and fmt(threshold.level),
    limit = threshold.limit and fmt(threshold.limit), value = fmt(figures.value),
    period = scope ~= '-' and scope or nil, grant_id = threshold.grant_id,
    expires_at = threshold.expires_at and fmt(threshold.expires_at)}
  if state and state ~= scope then
    redis.call('HDEL', sink.state, field)
    emit(sink, now, 'threshold.resolved', {metric = metric, threshold = threshold.name,
      kind = threshold.kind, period = state, reason = 'period_ended'})
    state = nil
  end
  if holds and not state then
    redis.call('HSET', sink.state, field, scope)
    emit(sink, now, 'threshold.crossed', data)
  elseif state and not holds then
    redis.call('HDEL', sink.state, field)
    data.reason = reason
    emit(sink, now, 'threshold.resolved', data)
  end
end

-- The period thresholds of one metric, for its committed units in `scope` (the
-- running period's id, or 'lifetime') and the prepaid units the period used.
-- `moved`, when given, is how many units the caller just added: only the
-- thresholds whose level lies between the figures before and after can have
-- changed, so only those are read (a record's common case reads none). The
-- sweep and the changes of terms watch them all (moved nil).
-- Whether a level of `limit` at one of `percents` lies in (low, high]: the
-- record's common case answers no here, without building the thresholds.
local function level_between(limit, percents, low, high)
  if not limit then
    return false
  end
  for _, p in ipairs(percents) do
    local level = level_of(limit, p)
    if low < level and level <= high then
      return true
    end
  end
  return false
end

local function watch_usage(sink, now, metric, limits, scope, committed, prepaid_used, reason, seen,
    moved)
  if not sink or not limits or not (limits.contract_quota or limits.hard_limit) then
    return
  end
  if moved and not limits.overage_unit_cap then
    local alerts = limits.alerts
    local low, high = math.min(committed, committed - moved), math.max(committed, committed - moved)
    if not (level_between(limits.contract_quota, alerts and alerts.quota or DEFAULT_ALERT_PERCENTS,
          low, high)
        or level_between(limits.hard_limit, alerts and alerts.hard or DEFAULT_ALERT_PERCENTS,
          low, high)) then
      return
    end
  end
  for _, t in ipairs(usage_thresholds(limits)) do
    local value = committed
    if t.kind == 'spend_cap' then
      value = committed - limits.contract_quota - prepaid_used
    end
    local low, high = value, value
    if moved then
      low, high = math.min(value, value - moved), math.max(value, value - moved)
    end
    if not moved or (low < t.level and t.level <= high) then
      -- A threshold at zero units holds only once there is usage.
      watch_threshold(sink, now, metric, t, value >= t.level and value > 0, scope,
        {value = value}, reason, seen)
    end
  end
end

-- The credit thresholds of one metric (set by the plan only): its balance of
-- grants (rollover grants come and go with the periods and are left out)
-- below an amount; each grant with units left expiring within a duration.
local function watch_credits(sink, now, credits_key, metric, limits, reason, seen)
  local alerts = limits and limits.alerts
  if not sink or not alerts or not (alerts.credits_below or alerts.expiring_ms) then
    return
  end
  local balance = 0
  local dated = {}
  for _, grant in ipairs(load_credits(credits_key)[metric] or {}) do
    if not grant.rollover and grant_live(grant, now) then
      balance = balance + grant.remaining
    end
    if alerts.expiring_ms and not grant.rollover and not grant.legacy and grant.expires > 0 then
      dated[#dated + 1] = grant
    end
  end
  if alerts.credits_below then
    local t = {name = 'credits_below:' .. fmt(alerts.credits_below), kind = 'credits_below',
      level = alerts.credits_below}
    watch_threshold(sink, now, metric, t, balance < alerts.credits_below, '-',
      {value = balance}, reason, seen)
  end
  -- A grant's threshold holds while it counts (or will) with units left and
  -- expires within the duration; used up, voided or expired, it resolves.
  for _, grant in ipairs(dated) do
    local t = {name = 'grant_expiring:' .. grant.id, kind = 'grant_expiring',
      grant_id = grant.id, expires_at = grant.expires}
    local holds = grant_can_count(grant, now) and grant.expires - now <= alerts.expiring_ms
    watch_threshold(sink, now, metric, t, holds, '-', {value = grant.remaining}, reason, seen)
  end
end

-- A hold's parts as an event's list of metrics.
local function hold_event_metrics(parts)
  local out = {}
  for i, p in ipairs(parts) do
    out[i] = {metric = p[1], units = fmt(p[2]), prepaid = fmt(p[3])}
  end
  return out
end

-- Take one hold's units out of the running held totals and forget it.
local function drop_hold(holds_key, holddata_key, held_key, request_id)
  local data = redis.call('HGET', holddata_key, request_id)
  redis.call('ZREM', holds_key, request_id)
  if not data then
    return nil
  end
  redis.call('HDEL', holddata_key, request_id)
  local parts = decode_hold(data)
  for _, p in ipairs(parts) do
    local metric, units, prepaid = p[1], p[2], p[3]
    -- Zero-unit parts are skipped: Lua would send -0, which HINCRBY refuses.
    if units > 0 and redis.call('HINCRBY', held_key, 'h:' .. metric, -units) <= 0 then
      redis.call('HDEL', held_key, 'h:' .. metric)
    end
    if prepaid > 0 and redis.call('HINCRBY', held_key, 'hp:' .. metric, -prepaid) <= 0 then
      redis.call('HDEL', held_key, 'hp:' .. metric)
    end
  end
  return parts
end

-- A hold is expired when now >= its expiry. Expired holds stop counting here,
-- lazily, at the start of every script that reads held totals. Returns the
-- units that expired, per metric, as "metric:units:0;..." ('' for none), which
-- the scripts hand back so that the server can count them.
local function purge_expired_holds(holds_key, holddata_key, held_key, now, sink)
  local expired = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now, 'WITHSCORES')
  local totals, order = {}, {}
  for i = 1, #expired, 2 do
    local request_id = expired[i]
    local dropped = drop_hold(holds_key, holddata_key, held_key, request_id)
    if dropped then
      emit(sink, now, 'hold.expired', {request_id = request_id, expired_at = expired[i + 1],
        metrics = hold_event_metrics(dropped)})
    end
    for _, p in ipairs(dropped or {}) do
      if not totals[p[1]] then
        totals[p[1]] = 0
        order[#order + 1] = p[1]
      end
      totals[p[1]] = totals[p[1]] + p[2]
    end
  end
  local parts = {}
  for i, metric in ipairs(order) do
    parts[i] = {metric, totals[metric], 0}
  end
  return encode_hold(parts)
end

-- Rows of figures for the server, one per metric, joined by ';': each row is a
-- table with named fields that `write_row` (check_row or record_row, generated
-- from the columns declared in store/replies.py) joins by ','.
local function encode_rows(rows, write_row)
  local out = {}
  for i, row in ipairs(rows) do
    out[i] = write_row(row)
  end
  return table.concat(out, ';')
end

-- Rate limit by GCRA (the generic cell rate algorithm): `rate` calls per second
-- on average, up to `burst` calls at once. `key` holds the theoretical arrival
-- time (ms), kept about one interval. Returns nil when the call is admitted (and
-- counted), else the ms to wait before it would be.
local function gcra(key, now, rate, burst)
  local interval = 1000 / rate
  local tat = math.max(tonumber(redis.call('GET', key) or now), now)
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    return math.ceil(allow_at - now)
  end
  redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
  return nil
end

-- The usage bucket of a metric: the month's hash, or the lifetime hash.
local function bucket_for(limits, month_key, life_key)
  if limits and limits.period == 'none' then
    return life_key, 'N'
  end
  return month_key, 'M'
end

-- Windows (a metric's "windows" in the plan, shortest first): fixed minute, hour,
-- day and week windows. `window_keys` maps each kind to the hash of the window
-- that contains the call's instant (c:<metric> committed units; the day's is the
-- day hash of the statistics). A window's used units are those committed in it
-- plus the metric's live holds: a hold counts against every window it is live
-- in, never less.
--
-- window_part: one window in a row's windows column,
-- "kind:limit:soft:used:exceeded:shadow" (used: see decide_windows and record.lua).
--
-- decide_windows: whether `n` more units fit each window. Returns the windows
-- column of a check row (window_part per window, joined by '/'; '' for none), the
-- hard window that denies ('' for none; of several, the longest, which resets
-- last), the most units every hard window admits now (nil without hard
-- windows), and the shadow window that would deny ('' for none; the longest).
-- Soft and shadow windows never deny nor cap.
local function window_part(w, used, exceeded)
  return w.window .. ':' .. fmt(w.limit) .. ':' .. bool01(w.soft) .. ':' .. fmt(used)
    .. ':' .. bool01(exceeded) .. ':' .. bool01(w.shadow)
end

local function decide_windows(windows, window_keys, metric, held, n)
  if not windows then
    return '', '', nil, ''
  end
  local parts, denied_by, cap, shadow_denied_by = {}, '', nil, ''
  for i, w in ipairs(windows) do
    local used = int(redis.call('HGET', window_keys[w.window], 'c:' .. metric)) + held
    local exceeded = used + n > w.limit
    if w.shadow then
      if exceeded then
        shadow_denied_by = w.window
      end
    elseif not w.soft then
      local room = math.max(0, w.limit - used)
      if cap == nil or room < cap then
        cap = room
      end
      if exceeded then
        denied_by = w.window
      end
    end
    parts[i] = window_part(w, used, exceeded)
  end
  return table.concat(parts, '/'), denied_by, cap, shadow_denied_by
end

-- The records index: a sorted set request_id -> requested-at (ms), newest last.
-- Entries requested before `cutoff` leave it, and it never holds more than
-- `cap` entries (the oldest leave first), so one organization's index is bounded
-- whatever its traffic. A record's own hash keeps its TTL: trimming the index
-- never forgets a request_id's idempotency. The index itself lives as long as
-- its longest-lived record (`ttl_ms`), so an organization that stops recording
-- leaves no index behind.
local function index_record(index_key, request_id, requested_ms, cutoff, cap, ttl_ms)
  redis.call('ZADD', index_key, 'NX', requested_ms, request_id)
  redis.call('ZREMRANGEBYSCORE', index_key, '-inf', '(' .. fmt(cutoff))
  local size = redis.call('ZCARD', index_key)
  if size > cap then
    redis.call('ZREMRANGEBYRANK', index_key, 0, size - cap - 1)
  end
  if redis.call('PTTL', index_key) < ttl_ms then
    redis.call('PEXPIRE', index_key, ttl_ms)
  end
end

-- One entry of the organization's audit trail, written in the same atomic step
-- as the change it describes. The stream keeps about `cap` entries (MAXLEN ~).
-- Entry ids are Redis's own; `at` is the rules' clock.
local function audit(audit_key, cap, now, actor, action, target, before, after, reason)
  redis.call('XADD', audit_key, 'MAXLEN', '~', cap, '*',
    'at', fmt(now), 'actor', actor, 'action', action, 'target', target,
    'before', before, 'after', after, 'reason', reason)
end

-- DecisionReason (protos/pagemeter/v1/quota.proto).
local REASON_UNSPECIFIED = 0
local REASON_WITHIN_QUOTA = 1
local REASON_PREPAID = 2
local REASON_OVERAGE = 3
local REASON_QUOTA_EXCEEDED = 4
local REASON_HARD_LIMIT_EXCEEDED = 5
local REASON_RATE_LIMITED = 6
local REASON_NO_PLAN = 7
local REASON_UNKNOWN_METRIC = 8
local REASON_FAIL_OPEN = 9
local REASON_WINDOW_LIMIT_EXCEEDED = 10
local REASON_SPEND_CAP_REACHED = 11

-- record_row(r): one metric's row, the fields of r joined by ',' in the order of
-- RECORD_COLUMNS (store/replies.py):
--   metric, units, included, prepaid, overage, committed, contract_quota,
--   hard_limit, over_contract_quota, over_hard_limit, overage_not_allowed,
--   lifetime, overage_price, planned, windows, over_spend_cap
local function record_row(r)
  return r.metric .. ',' ..
    fmt(r.units) .. ',' ..
    fmt(r.included) .. ',' ..
    fmt(r.prepaid) .. ',' ..
    fmt(r.overage) .. ',' ..
    fmt(r.committed) .. ',' ..
    opt(r.contract_quota) .. ',' ..
    opt(r.hard_limit) .. ',' ..
    bool01(r.over_contract_quota) .. ',' ..
    bool01(r.over_hard_limit) .. ',' ..
    bool01(r.overage_not_allowed) .. ',' ..
    (r.lifetime and 'N' or 'M') .. ',' ..
    r.overage_price .. ',' ..
    bool01(r.planned) .. ',' ..
    r.windows .. ',' ..
    bool01(r.over_spend_cap)
end

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
