-- Count tokens a worker generated and the store did not keep (another write of those items came
-- first), on the job's hash.  Guarded by the state table (any status; the job's incarnation), but
-- a counter is no transition: a job gone or another incarnation counts nothing, with no error.
-- KEYS: job; ARGV: inc, allowed statuses, tokens, items.  Returns the job's wasted tokens so far
-- (0 when it is gone or another incarnation).
local status = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return 0 end
redis.call('HINCRBY', KEYS[1], 'wasted_items', ARGV[4])
return redis.call('HINCRBY', KEYS[1], 'wasted_tokens', ARGV[3])
