-- Append chunk messages to the job's backlog, while the job may publish (this incarnation, not
-- ending or ended), and put the job in its queue's ring in the same step, as '<job>@<inc>': an
-- entry names the incarnation it serves (dispatch.lua drops one of another), and a publish of an
-- incarnation that is gone adds none.  A partial job's backlog lives as long as the job.
-- KEYS: job, backlog, ring; ARGV: inc, allowed statuses, job id, then messages (none: only put
-- back in the ring a job whose backlog is not empty, after a publish cut short).
-- Returns how many messages were appended.
local status, refused = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return refused end
if #ARGV >= 4 then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, 4))
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 then redis.call('PEXPIRE', KEYS[2], pttl) end
end
if redis.call('LLEN', KEYS[2]) > 0 then
  local entry = ARGV[3] .. '@' .. (redis.call('HGET', KEYS[1], 'inc') or '')
  -- a new job goes to the ring's right end: it is served next
  if not redis.call('LPOS', KEYS[3], entry) then redis.call('RPUSH', KEYS[3], entry) end
end
return #ARGV - 3
