-- A delivery of a chunk ends: forget that a worker runs it ('running'), or also give back its
-- attempt ('handback': shut down, not a failure).  Only for this incarnation of a job that still
-- exists: a chunk of a deleted job creates no key (nothing without a TTL is left behind).
-- KEYS: job, attempts, running; ARGV: inc, allowed statuses, chunk, 'running' | 'handback'
local status, refused = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return refused end
if ARGV[4] == 'handback' and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], -1)
end
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
