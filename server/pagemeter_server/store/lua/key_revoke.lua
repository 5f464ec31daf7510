-- key_revoke.lua: RevokeApiKey. Marks a tenant API key revoked; key_auth.lua
-- refuses it from the next call on. Idempotent.
--
-- KEYS[1] key     pm:{org}:key:<key_id>
-- KEYS[2] audit   pm:{org}:audit         stream (the audit trail)
--
-- ARGV[1] now_ms
-- ARGV[2] key_id
-- ARGV[3] actor
-- ARGV[4] audit trail length (entries kept, about)
--
-- Returns {'NOT_FOUND'} or {'OK', already_revoked ('1'/'0')}.

assert(#KEYS == 2 and #ARGV == 4, 'key_revoke.lua: wrong number of KEYS or ARGV')
local revoked = redis.call('HGET', KEYS[1], 'revoked')
if not revoked then
  return {'NOT_FOUND'}
end
if revoked == '1' then
  return {'OK', '1'}
end
redis.call('HSET', KEYS[1], 'revoked', '1', 'revoked_ms', ARGV[1])
audit(KEYS[2], ARGV[4], tonumber(ARGV[1]), ARGV[3], 'api_key.revoke', ARGV[2],
  cjson.encode({revoked = false}), cjson.encode({revoked = true}), '')
return {'OK', '0'}
