local job, results, workers = KEYS[1], KEYS[2], KEYS[3]
local now, ttl, worker, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if redis.call('EXISTS', job) == 0 then return -1 end
local written, items, ptoks, ctoks = 0, 0, 0, 0
for i = 0, n - 1 do
  local b = 5 + i * 5
  if redis.call('HSETNX', results, ARGV[b], ARGV[b + 1]) == 1 then
    written = written + 1
    redis.call('HINCRBY', job, ARGV[b + 2], 1)
    local p, c = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    if ARGV[b + 2] == 'succeeded' then items = items + 1 end
    ptoks = ptoks + p
    ctoks = ctoks + c
  end
end
if written == 0 then return 0 end
if ptoks > 0 then redis.call('HINCRBY', job, 'prompt_tokens', ptoks) end
if ctoks > 0 then redis.call('HINCRBY', job, 'completion_tokens', ctoks) end
if worker ~= '' then
  redis.call('HINCRBY', workers, worker .. ':items', items)
  redis.call('HINCRBY', workers, worker .. ':tokens', ctoks)
end
local status = redis.call('HGET', job, 'status')
if status == 'queued' then
  redis.call('HSET', job, 'status', 'in_progress')
  status = 'in_progress'
end
redis.call('HSETNX', job, 'started_at', now)
redis.call('HSET', job, 'updated_at', now)
local c = redis.call('HMGET', job, 'total', 'succeeded', 'errored', 'cancelled', 'expired')
local total = tonumber(c[1]) or 0
local cancelled, expired = tonumber(c[4]) or 0, tonumber(c[5]) or 0
local done = (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0) + cancelled + expired
if done >= total then
  local final = 'completed'
  if cancelled > 0 then final = 'cancelled' elseif expired > 0 then final = 'expired' end
  redis.call('HSET', job, 'status', final, 'finished_at', now)
  for k = 4, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
  redis.call('PUBLISH', job .. ':events', final)
end
return written
