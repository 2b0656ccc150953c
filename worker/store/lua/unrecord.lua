local job, results = KEYS[1], KEYS[2]
local removed = 0
for i = 1, #ARGV do
  local raw = redis.call('HGET', results, ARGV[i])
  if raw then
    local r = cjson.decode(raw)
    if r['status'] == 'error' then
      local kind = 'errored'
      local t = r['error'] and r['error']['type'] or ''
      if t == 'cancelled' then kind = 'cancelled' elseif t == 'expired' then kind = 'expired' end
      redis.call('HDEL', results, ARGV[i])
      redis.call('HINCRBY', job, kind, -1)
      removed = removed + 1
    end
  end
end
if removed > 0 then
  redis.call('HSET', job, 'status', 'in_progress')
  redis.call('HDEL', job, 'finished_at')
  for k = 3, #KEYS do redis.call('PERSIST', KEYS[k]) end
end
return removed
