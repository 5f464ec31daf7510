-- void_grant.lua: VoidCreditGrant. What is left of a credit grant stops counting.
--
-- KEYS[1] credits  pm:{org}:credits  hash of credit grants (see _lib.lua)
-- KEYS[2] audit    pm:{org}:audit    stream (the audit trail)
--
-- ARGV[1] grant_id
-- ARGV[2] now_ms
-- ARGV[3] reason
-- ARGV[4] actor (who made the change, for the audit trail)
-- ARGV[5] audit trail length (entries kept, about)
--
-- Returns {'NOT_FOUND'} (no such grant, or one dropped after it ran out), or
--   {'OK', voided_units, already_voided}.

assert(#KEYS == 2 and #ARGV == 5, 'void_grant.lua: wrong number of KEYS or ARGV')
-- The grant, and a balance of an earlier release read as this grant
-- ("prepaid-<metric>") when it has not been migrated yet.
local grant, legacy
for metric, grants in pairs(load_credits(KEYS[1])) do
  for _, candidate in ipairs(grants) do
    if candidate.legacy then
      if 'prepaid-' .. metric == ARGV[1] then
        legacy = candidate
      end
    elseif candidate.id == ARGV[1] then
      grant = candidate
    end
  end
end
if not grant and not legacy then
  return {'NOT_FOUND'}
end
if grant and grant.state == 'V' and not legacy then
  return {'OK', 0, '1'}
end
local voided = 0
if legacy then
  -- The balance becomes the voided grant it was read as.
  redis.call('HDEL', KEYS[1], legacy.metric)
  voided = voided + math.max(0, legacy.remaining)
  if not grant then
    grant = prepaid_grant(legacy.metric)
    grant.units = math.max(0, legacy.remaining)
  end
end
if grant.state ~= 'V' then
  voided = voided + grant.remaining
end
grant.remaining, grant.state = 0, 'V'
redis.call('HSET', KEYS[1], 'g:' .. ARGV[1], encode_grant(grant))
audit(KEYS[2], ARGV[5], tonumber(ARGV[2]), ARGV[4], 'credits.void', grant.metric,
  cjson.encode({grant_id = ARGV[1], remaining = fmt(voided)}),
  cjson.encode({grant_id = ARGV[1], remaining = '0'}), ARGV[3])
return {'OK', voided, '0'}
