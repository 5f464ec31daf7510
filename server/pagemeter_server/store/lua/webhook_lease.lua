-- webhook_lease.lua: a dispatcher renews or gives up its lease of a partition
-- of the organizations, only while the lease is still its own (a lease that
-- expired may be another dispatcher's by now). Leases are taken with SET NX PX.
--
-- KEYS[1] lease  pm:wh:lease:<partition>   string: the owner's id
--
-- ARGV[1] op      'renew' or 'release'
-- ARGV[2] owner   the dispatcher's id
-- ARGV[3] ttl_ms  the lease's new time to live (renew)
--
-- Returns 1 when the lease was the owner's (renewed or released), else 0.

assert(#KEYS == 1 and #ARGV == 3, 'webhook_lease.lua: wrong number of KEYS or ARGV')
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return 1
