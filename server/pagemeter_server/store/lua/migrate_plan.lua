-- migrate_plan.lua: the migration of stored plans (store/plan_migration.py) for
-- one organization. Replaces documents of its current plan and of its plan log
-- with their schema 2 text, as the server converted them, in one atomic step.
-- Compare-and-set: a document is replaced only if it is still the text the
-- server read, so a SetPlan that came in between is never undone. Plan
-- versions, update times and the audit trail are left as they are (the terms
-- did not change, only their spelling).
--
-- KEYS[1] plan     pm:{org}:plan     hash {json, version, updated_ms}
-- KEYS[2] planver  pm:{org}:planver  hash version -> plan JSON
--
-- ARGV[1] n, the documents to replace; then 3 ARGV per document: '' for the
--         current plan or its plan log version, the text read, the new text
--
-- Returns {replaced, changed}: documents replaced, and documents left because
-- their text was not the one read any more (the server reads and tries again).

assert(#KEYS == 2 and #ARGV == 1 + 3 * tonumber(ARGV[1]), 'migrate_plan.lua: wrong number of KEYS or ARGV')
local replaced, changed = 0, 0
for i = 1, tonumber(ARGV[1]) do
  local version, old, new = ARGV[3 * i - 1], ARGV[3 * i], ARGV[3 * i + 1]
  local key, field = KEYS[2], version
  if version == '' then
    key, field = KEYS[1], 'json'
  end
  if redis.call('HGET', key, field) == old then
    redis.call('HSET', key, field, new)
    replaced = replaced + 1
  else
    changed = changed + 1
  end
end
return {replaced, changed}
