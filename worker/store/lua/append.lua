-- Append chunk messages to the job's backlog, while the job may publish (this incarnation, not
-- ending or ended); a partial job's backlog lives as long as the job.
-- KEYS: job, backlog; ARGV: inc, allowed statuses, then messages.  Returns how many.
local status, refused = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return refused end
if #ARGV < 3 then return 0 end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 3))
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then redis.call('PEXPIRE', KEYS[2], pttl) end
return #ARGV - 2
