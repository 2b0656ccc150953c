-- A page of results is durably in a collector's output: mark each drained and free its memory.
-- KEYS: job, results, inputs, drained (bitmap: bit n set once item n is in the output),
--       drained_errors (hash: index -> result json of a drained error)
-- ARGV: inc, allowed statuses (the state table's guard: a job gone, or another incarnation of
--       its id, drains nothing), then n x (index, sha1 of the result json as read, keep)
-- keep = 1 (an error, which `genq retry` may run again): the result moves to drained_errors (out
-- of the results hash, which a follower scans) and the input stays; keep = 0: both are deleted.  A result that changed since it was read (a
-- retry replaced it) is left alone: the newer one is drained in its turn.  Idempotent: a page
-- confirmed twice (a collector killed between its write and this call) changes nothing more.
-- Returns how many results were marked.
local job, results, inputs, drained, errors = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local status, refused = guard(job, ARGV[1], ARGV[2])
if not status then return refused end
local marked = 0
for i = 3, #ARGV, 3 do
  local v = redis.call('HGET', results, ARGV[i])
  if v and redis.sha1hex(v) == ARGV[i + 1] then
    redis.call('SETBIT', drained, tonumber(ARGV[i]), 1)
    redis.call('HDEL', results, ARGV[i])
    if ARGV[i + 2] == '0' then
      -- item 0's input stays: it tells what the job's items are (the Batch object's endpoint)
      if ARGV[i] ~= '0' then redis.call('HDEL', inputs, ARGV[i]) end
    else
      redis.call('HSET', errors, ARGV[i], v)
    end
    marked = marked + 1
  end
end
-- they live as long as the job's other keys (a finished job's retention TTL)
local pttl = redis.call('PTTL', job)
if pttl > 0 then
  redis.call('PEXPIRE', drained, pttl)
  redis.call('PEXPIRE', errors, pttl)
end
return marked
