-- webhook_endpoint.lua: CreateWebhookEndpoint, UpdateWebhookEndpoint,
-- RotateWebhookSecret and DeleteWebhookEndpoint. The endpoints of the whole
-- deployment are one hash (they are few, at most ARGV[4]); a change replaces an
-- endpoint's document only if it is still the text the server read, so two
-- operators' changes never undo each other (the loser reads again).
--
-- KEYS[1] endpoints  pm:webhooks   hash: endpoint id -> endpoint JSON
--
-- ARGV[1] op         'create', 'replace' or 'delete'
-- ARGV[2] endpoint id
-- ARGV[3] expected   the document as read (replace, delete; '' for create)
-- ARGV[4] most endpoints the deployment may have
-- ARGV[5] document   the new JSON (create, replace; '' for delete)
--
-- Returns {'OK'}, {'EXISTS'}, {'TOO_MANY'}, {'NOT_FOUND'} or {'CHANGED'}.

assert(#KEYS == 1 and #ARGV == 5, 'webhook_endpoint.lua: wrong number of KEYS or ARGV')
local op, id = ARGV[1], ARGV[2]
local current = redis.call('HGET', KEYS[1], id)
if op == 'create' then
  if current then
    return {'EXISTS'}
  end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
    return {'TOO_MANY'}
  end
  redis.call('HSET', KEYS[1], id, ARGV[5])
  return {'OK'}
end
if not current then
  return {'NOT_FOUND'}
end
if current ~= ARGV[3] then
  return {'CHANGED'}
end
if op == 'delete' then
  redis.call('HDEL', KEYS[1], id)
else
  redis.call('HSET', KEYS[1], id, ARGV[5])
end
return {'OK'}
