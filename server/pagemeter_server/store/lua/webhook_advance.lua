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
