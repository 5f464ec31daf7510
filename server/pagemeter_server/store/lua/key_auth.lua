-- key_auth.lua: authenticates a tenant API key and applies the per-key read
-- flood limit, in one round trip.
--
-- KEYS[1] key     pm:{org}:key:<key_id>
-- KEYS[2] rate    pm:{org}:krate:<key_id>  GCRA theoretical arrival time (ms)
--
-- ARGV[1] now_ms
-- ARGV[2] digest (hex SHA-256 of the key presented)
-- ARGV[3] last-used resolution (ms): last_used_ms is rewritten at most this often
-- ARGV[4] calls per second allowed (0: no limit)
-- ARGV[5] burst (calls)
--
-- Returns {'INVALID'} for an unknown key or a wrong secret, {'REVOKED'},
-- {'RATE_LIMITED', retry_after_ms}, or {'OK'}.
-- The digests compared are of high-entropy secrets, so comparing them with
-- plain string equality leaks nothing an attacker can use.

assert(#KEYS == 2 and #ARGV == 5, 'key_auth.lua: wrong number of KEYS or ARGV')
local now = tonumber(ARGV[1])
local key = redis.call('HMGET', KEYS[1], 'digest', 'revoked', 'last_used_ms')
if not key[1] or key[1] ~= ARGV[2] then
  return {'INVALID'}
end
if key[2] == '1' then
  return {'REVOKED'}
end

local rate = tonumber(ARGV[4])
if rate > 0 then
  -- The configured burst, but never less than one call.
  local wait = gcra(KEYS[2], now, rate, math.max(1, tonumber(ARGV[5])))
  if wait then
    return {'RATE_LIMITED', fmt(wait)}
  end
end

if now - int(key[3]) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'last_used_ms', ARGV[1])
end
return {'OK'}
