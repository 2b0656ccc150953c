-- Count tokens a worker generated and the store did not keep (another write of those items came
-- first), on the job's hash, which is never recreated for a job that is gone.
-- KEYS: job; ARGV: tokens, items.  Returns the job's wasted tokens so far (0 when it is gone).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'wasted_items', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'wasted_tokens', ARGV[1])
