-- End a cancelling job once no live worker runs one of its chunks: every item without a result
-- is counted as cancelled (or expired), as a number, never a row per item.
-- KEYS: job, running, then every key of the job (EXPIRE'd)
-- ARGV: now, retention ttl, horizon (a running entry older than this is a dead worker's)
-- Returns 1 when the job ended now, 0 when chunks still run, -1 when it is not cancelling.
local job, running = KEYS[1], KEYS[2]
local now, ttl, horizon = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HGET', job, 'status') ~= 'cancelling' then return -1 end
local entries = redis.call('HVALS', running)
for _, v in ipairs(entries) do
  local since = tonumber(string.match(v, '|([%d%.]+)$') or '0')
  if since >= horizon then return 0 end
end
local c = redis.call('HMGET', job, 'total', 'succeeded', 'errored', 'ending')
local left = (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0) - (tonumber(c[3]) or 0)
local final = c[4] == 'expired' and 'expired' or 'cancelled'
local total = tonumber(c[1]) or 0
if left <= 0 and total > 0 then
  left, final = 0, 'completed'  -- everything finished before the end took effect
elseif left <= 0 then
  left = 0  -- cancelled during its submit before any input was stored: a job of nothing
else
  redis.call('HSET', job, final, left)
end
redis.call('HSET', job, 'status', final, 'finished_at', now, 'updated_at', now)
redis.call('HSETNX', job, 'first_finished_at', now)
for k = 3, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
withdraw(job)
redis.call('PUBLISH', job .. ':events', final)
return 1
