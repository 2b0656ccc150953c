-- A delivery of a chunk starts: count the attempt, note who runs it, start the job's clock.
-- KEYS: job, attempts, running; ARGV: chunk, "worker|since", now
-- Returns the attempt number of this delivery, or 0 when the job does not exist.
local job, attempts, running = KEYS[1], KEYS[2], KEYS[3]
local status = redis.call('HGET', job, 'status')
if not status then return 0 end
local n = redis.call('HINCRBY', attempts, ARGV[1], 1)
redis.call('HSET', running, ARGV[1], ARGV[2])
local pttl = redis.call('PTTL', job)
if pttl > 0 then
  redis.call('PEXPIRE', attempts, pttl)
  redis.call('PEXPIRE', running, pttl)
end
if status == 'queued' then redis.call('HSET', job, 'status', 'in_progress') end
redis.call('HSETNX', job, 'started_at', ARGV[3])
return n
