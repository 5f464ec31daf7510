-- key_create.lua: CreateApiKey. Stores a new tenant API key of an organization:
-- only the SHA-256 digest of its secret, never the secret.
--
-- KEYS[1] key     pm:{org}:key:<key_id>  hash {digest, name, created_ms, last_used_ms, revoked, revoked_ms}
-- KEYS[2] keys    pm:{org}:keys          zset key_id -> created_ms
-- KEYS[3] audit   pm:{org}:audit         stream (the audit trail)
--
-- ARGV[1] now_ms
-- ARGV[2] key_id
-- ARGV[3] digest (hex SHA-256 of the whole key)
-- ARGV[4] name
-- ARGV[5] actor
-- ARGV[6] audit trail length (entries kept, about)
-- ARGV[7] most keys an organization may have, revoked ones included (its
--         ListApiKeys answer lists them all, so their number is bounded)
--
-- Returns {'EXISTS'} if key_id is taken, {'TOO_MANY', cap} if the organization
-- has the most keys allowed (nothing changed in either case), else {'OK'}.

assert(#KEYS == 3 and #ARGV == 7, 'key_create.lua: wrong number of KEYS or ARGV')
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'EXISTS'}
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then
  return {'TOO_MANY', ARGV[7]}
end
redis.call('HSET', KEYS[1], 'digest', ARGV[3], 'name', ARGV[4], 'created_ms', ARGV[1],
  'last_used_ms', '0', 'revoked', '0', 'revoked_ms', '0')
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
audit(KEYS[3], ARGV[6], tonumber(ARGV[1]), ARGV[5], 'api_key.create', ARGV[2], '',
  cjson.encode({key_id = ARGV[2], name = ARGV[4]}), '')
return {'OK'}
