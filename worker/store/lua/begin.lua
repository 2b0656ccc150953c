-- A submit begins: create the job as 'submitting' (a new incarnation), unless it exists.
-- KEYS: job hash, jobs index, then the job's other keys (what an older incarnation left: removed,
--       so nothing of it is counted for the new one)
-- ARGV: inc, job id, created_at, submit ttl, then field, value pairs of the new hash
-- Returns {status, inc} of the job found, or {'submitting', inc} of the one created.
local job = KEYS[1]
local found = redis.call('HMGET', job, 'status', 'inc')
if found[1] then return {found[1], found[2] or ''} end
for k = 3, #KEYS do redis.call('DEL', KEYS[k]) end
redis.call('HSET', job, 'status', 'submitting', 'inc', ARGV[1], unpack(ARGV, 5))
redis.call('EXPIRE', job, ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return {'submitting', ARGV[1]}
