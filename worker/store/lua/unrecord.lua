-- Forget errored results so their items can run again (genq retry); reopen the job.  Only from
-- the statuses the state table allows a retry from (never a cancelled or expired job).
-- KEYS: job, results, then every key of the job (PERSIST'ed: the job is live again)
-- ARGV: inc, allowed statuses, then n x (index, the result json as read, its counter); a result
-- that changed meanwhile is left alone.  The first finish time is kept (figures are computed over
-- the first run).
local job, results = KEYS[1], KEYS[2]
local status, refused = guard(job, ARGV[1], ARGV[2])
if not status then return refused end
local removed = 0
for i = 3, #ARGV, 3 do
  if redis.call('HGET', results, ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', results, ARGV[i])
    redis.call('HINCRBY', job, ARGV[i + 2], -1)
    removed = removed + 1
  end
end
if removed > 0 then
  redis.call('HSET', job, 'status', 'in_progress')
  redis.call('HDEL', job, 'finished_at')
  for k = 3, #KEYS do redis.call('PERSIST', KEYS[k]) end
end
return removed
