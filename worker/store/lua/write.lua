-- A submit writes a page of inputs, while the job is still this incarnation and 'submitting'; every
-- key of the partial job gets its TTL again (a live submit keeps its job alive).
-- KEYS: job, inputs, then the job's other keys
-- ARGV: inc, allowed statuses, submit ttl, now, inputs written, then index, item json pairs
local status, refused = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return refused end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('HSET', KEYS[1], 'inputs_written', ARGV[5], 'updated_at', ARGV[4])
for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], ARGV[3]) end
return 1
