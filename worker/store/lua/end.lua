-- Cancel or expire: a live job becomes 'cancelling' (settle.lua ends it once no chunk runs) and
-- its backlog, its ring entries and its messages waiting on the queues are dropped (withdraw).
-- A job cancelled during its submit keeps the items stored so far.
-- KEYS: job, backlog; ARGV: inc, allowed statuses, ending ('cancelled' | 'expired'), now,
--       '1' to end only when the job's deadline (expires_at) has passed
-- Returns 1 when the job started ending now, 0 when it was not live or not due.
local job = KEYS[1]
local status, refused = guard(job, ARGV[1], ARGV[2])
if not status then return refused end
if status ~= 'submitting' and status ~= 'queued' and status ~= 'in_progress' then return 0 end
if ARGV[5] == '1' then
  local due = tonumber(redis.call('HGET', job, 'expires_at') or '')
  if not due or due > tonumber(ARGV[4]) then return 0 end
end
if status == 'submitting' and (tonumber(redis.call('HGET', job, 'total') or '0') or 0) == 0 then
  redis.call('HSET', job, 'total', redis.call('HGET', job, 'inputs_written') or 0)
end
redis.call('HSET', job, 'status', 'cancelling', 'ending', ARGV[3], 'updated_at', ARGV[4])
redis.call('DEL', KEYS[2])
withdraw(job)  -- its backlog, ring entries and queued messages, in the step that ends it
return 1
