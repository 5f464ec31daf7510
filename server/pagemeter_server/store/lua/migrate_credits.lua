-- migrate_credits.lua: the migration of prepaid balances of earlier releases
-- (store/plan_migration.py) for one organization. Each balance field
-- (<metric> -> units) becomes the credit grant "prepaid-<metric>": never
-- expiring, priority 50, effective since ever, as the balance was read. A
-- balance written after an earlier migration (by a server of an earlier
-- release still running) is added to that grant. In one atomic step, so no
-- call sees the units twice or not at all.
--
-- KEYS[1] credits  pm:{org}:credits  hash of credit grants (see _lib.lua)
--
-- ARGV[1] none: the script takes no arguments
--
-- Returns the number of balances turned into grants.

assert(#KEYS == 1 and #ARGV == 0, 'migrate_credits.lua: wrong number of KEYS or ARGV')
local converted = 0
for metric, grants in pairs(load_credits(KEYS[1])) do
  local legacy, existing
  for _, grant in ipairs(grants) do
    if grant.legacy then
      legacy = grant
    elseif grant.id == 'prepaid-' .. metric then
      existing = grant
    end
  end
  if legacy then
    redis.call('HDEL', KEYS[1], metric)
    converted = converted + 1
    if legacy.remaining > 0 then
      local grant = existing or prepaid_grant(metric)
      grant.remaining = grant.remaining + legacy.remaining
      grant.units = grant.units + legacy.remaining
      redis.call('HSET', KEYS[1], 'g:' .. grant.id, encode_grant(grant))
    end
  end
end
return converted
