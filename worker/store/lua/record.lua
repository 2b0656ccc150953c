-- Record results, first write wins; move the counters; finish the job when every item is done
-- (and take its remaining messages out of the queues: guard.lua's withdraw).
-- KEYS: job, results, workers, then every key of the job (EXPIRE'd when the job finishes)
-- ARGV: inc, allowed statuses, now, retention ttl, worker, n, then n x (index, result json,
--       counter, prompt tokens, completion tokens); the counter is computed in Python
--       (worker.core.counting).
-- Returns the indices whose results were new (the first write of each); a refusal when the job is
-- gone or another incarnation, or has ended (cancelled or expired: what was not done then stays
-- counted as such).
local job, results, workers = KEYS[1], KEYS[2], KEYS[3]
local status, refused = guard(job, ARGV[1], ARGV[2])
if not status then return refused end
local now, ttl, worker, n = ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local written, items, ptoks, ctoks = {}, 0, 0, 0
-- an item drained to a collector's output (its result left Redis) is done: a late write loses
local drained = job .. ':drained'
for i = 0, n - 1 do
  local b = 7 + i * 5
  if redis.call('GETBIT', drained, tonumber(ARGV[b])) == 0
      and redis.call('HSETNX', results, ARGV[b], ARGV[b + 1]) == 1 then
    written[#written + 1] = tonumber(ARGV[b])
    redis.call('HINCRBY', job, ARGV[b + 2], 1)
    if ARGV[b + 2] == 'succeeded' then items = items + 1 end
    ptoks = ptoks + tonumber(ARGV[b + 3])
    ctoks = ctoks + tonumber(ARGV[b + 4])
  end
end
if #written == 0 then return written end
if ptoks > 0 then redis.call('HINCRBY', job, 'prompt_tokens', ptoks) end
if ctoks > 0 then redis.call('HINCRBY', job, 'completion_tokens', ctoks) end
if worker ~= '' then
  redis.call('HINCRBY', workers, worker .. ':items', items)
  redis.call('HINCRBY', workers, worker .. ':tokens', ctoks)
end
-- a key created while the job is still being submitted lives as long as the partial job does
local pttl = redis.call('PTTL', job)
if pttl > 0 then
  redis.call('PEXPIRE', results, pttl)
  redis.call('PEXPIRE', workers, pttl)
end
if status == 'queued' then redis.call('HSET', job, 'status', 'in_progress') end
redis.call('HSETNX', job, 'started_at', now)
redis.call('HSET', job, 'updated_at', now)
local c = redis.call('HMGET', job, 'total', 'succeeded', 'errored')
local done = (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
-- a job still being submitted (or whose submit was interrupted) finishes when its submit does
if done >= (tonumber(c[1]) or 0) and status ~= 'submitting' then
  redis.call('HSET', job, 'status', 'completed', 'finished_at', now)
  redis.call('HSETNX', job, 'first_finished_at', now)
  for k = 4, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
  withdraw(job)  -- in this step: a retry may reopen the job right after it
  redis.call('PUBLISH', job .. ':events', 'completed')
end
return written
