-- A page of results is durably in a collector's output: mark each drained and free its memory.
-- KEYS: job, results, inputs (hash: b<n> -> block n of the inputs), drained (bitmap: bit n set
--       once item n is in the output), drained_errors (hash: index -> result json of a drained
--       error), kept_inputs (hash: index -> item json of a drained error)
-- ARGV: inc, allowed statuses (the state table's guard: a job gone, or another incarnation of
--       its id, drains nothing), items per input block, then n x (index, sha1 of the result json
--       as read, keep, the item's input json when keep = 1)
-- keep = 1 (an error, which `genq retry` may run again): the result moves to drained_errors (out
-- of the results hash, which a follower scans) and its input to kept_inputs; keep = 0: both are
-- deleted.  A block of inputs is deleted once every item of it is drained (block 0 stays: item 0
-- tells what the job's items are, the Batch object's endpoint).  A result that changed since it
-- was read (a retry replaced it) is left alone: the newer one is drained in its turn.
-- Idempotent: a page confirmed twice (a collector killed between its write and this call)
-- changes nothing more.  Returns how many results were marked.
local job, results, inputs, drained, errors, kept = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local status, refused = guard(job, ARGV[1], ARGV[2])
if not status then return refused end
local size = tonumber(ARGV[3])
local marked, touched = 0, {}
for i = 4, #ARGV, 4 do
  local v = redis.call('HGET', results, ARGV[i])
  if v and redis.sha1hex(v) == ARGV[i + 1] then
    local index = tonumber(ARGV[i])
    redis.call('SETBIT', drained, index, 1)
    redis.call('HDEL', results, ARGV[i])
    if ARGV[i + 2] == '0' then
      redis.call('HDEL', kept, ARGV[i])
      -- a job an older genq stored has a field per item (item 0's stays, as block 0 does)
      if index > 0 then redis.call('HDEL', inputs, ARGV[i]) end
    else
      redis.call('HSET', errors, ARGV[i], v)
      if ARGV[i + 3] ~= '' then redis.call('HSET', kept, ARGV[i], ARGV[i + 3]) end
    end
    touched[math.floor(index / size)] = true
    marked = marked + 1
  end
end
local total = tonumber(redis.call('HGET', job, 'total') or '0') or 0
for block in pairs(touched) do
  local first, last = block * size, math.min((block + 1) * size, total) - 1
  local whole = block > 0 and last >= first
  for k = first, last do
    if not whole then break end
    whole = redis.call('GETBIT', drained, k) == 1
  end
  if whole then redis.call('HDEL', inputs, 'b' .. block) end
end
-- they live as long as the job's other keys (a finished job's retention TTL)
local pttl = redis.call('PTTL', job)
if pttl > 0 then
  redis.call('PEXPIRE', drained, pttl)
  redis.call('PEXPIRE', errors, pttl)
  redis.call('PEXPIRE', kept, pttl)
end
return marked
