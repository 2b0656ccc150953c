-- A submit has written every input and published every chunk: the job leaves 'submitting'.
-- KEYS: every key of the job, its hash first (PERSIST'ed: the partial job's TTL is lifted)
-- ARGV: inc, allowed statuses, now, retention ttl.  A job whose items were all done meanwhile
-- (every line invalid, or workers faster than the submit) finishes here.  A job already past
-- 'submitting' (a second submit) is left as it is.  Returns the status it is left in.
local job = KEYS[1]
local status, refused = guard(job, ARGV[1], ARGV[2])
if not status then return refused end
local now, ttl = ARGV[3], tonumber(ARGV[4])
if status ~= 'submitting' then return status end
local c = redis.call('HMGET', job, 'total', 'succeeded', 'errored', 'started_at')
if (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0) >= (tonumber(c[1]) or 0) then
  redis.call('HSET', job, 'status', 'completed', 'finished_at', now, 'updated_at', now)
  redis.call('HSETNX', job, 'first_finished_at', now)
  for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
  withdraw(job)
  redis.call('PUBLISH', job .. ':events', 'completed')
  return 'completed'
end
status = c[4] and 'in_progress' or 'queued'
redis.call('HSET', job, 'status', status, 'updated_at', now)
for k = 1, #KEYS do redis.call('PERSIST', KEYS[k]) end
return status
