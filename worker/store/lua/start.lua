-- A delivery of a chunk starts: count the attempt, note who runs it, start the job's clock; only
-- while the job is this incarnation and live (a chunk of a job ending, ended or gone is refused).
-- KEYS: job, attempts, running; ARGV: inc, allowed statuses, chunk, "worker|since", now
-- Returns the attempt number of this delivery.
local job, attempts, running = KEYS[1], KEYS[2], KEYS[3]
local status, refused = guard(job, ARGV[1], ARGV[2])
if not status then return refused end
local n = redis.call('HINCRBY', attempts, ARGV[3], 1)
redis.call('HSET', running, ARGV[3], ARGV[4])
local pttl = redis.call('PTTL', job)
if pttl > 0 then
  redis.call('PEXPIRE', attempts, pttl)
  redis.call('PEXPIRE', running, pttl)
end
if status == 'queued' then redis.call('HSET', job, 'status', 'in_progress') end
redis.call('HSETNX', job, 'started_at', ARGV[5])
return n
