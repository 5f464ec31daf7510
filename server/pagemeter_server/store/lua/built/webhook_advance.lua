-- webhook_advance.lua: a dispatcher moves an endpoint's cursor in an
-- organization's event stream past an event it delivered (or dead-lettered, or
-- skipped by the endpoint's filter), only if the cursor is still where the
-- dispatcher read it: a cursor never moves back, and of two dispatchers that
-- both delivered an event (a lease taken over) only one moves it.
--
-- KEYS[1] cursors  pm:{org}:whcursor   hash: endpoint id (or r:<replay id>) -> entry id
-- KEYS[2] retries  pm:{org}:whretry    hash: the same field -> retry state
-- KEYS[3] replays  pm:{org}:whreplays  hash: replay id -> its definition
--
-- ARGV[1] field      the endpoint id, or r:<replay id> for a replay
-- ARGV[2] expected   the cursor as read ('' when there was none)
-- ARGV[3] new        the entry id delivered
-- ARGV[4] ttl_ms     how long the keys live without another move
-- ARGV[5] finished   the replay id when this ends the replay ('' otherwise)
--
-- Returns {'OK'} or {'MOVED', current cursor}.
--
-- Generated from server/pagemeter_server/store/lua/webhook_advance.lua by `make scripts`; do not edit.
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

assert(#KEYS == 3 and #ARGV == 5, 'webhook_advance.lua: wrong number of KEYS or ARGV')
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then
  return {'MOVED', current}
end
local ttl = tonumber(ARGV[4])
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[5] ~= '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[5])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {'OK'}
