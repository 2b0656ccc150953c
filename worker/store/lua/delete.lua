-- Delete a job: every key and its index entry.  With an incarnation, only that one (a submit
-- undoing itself never removes a newer job of the same id); with a cutoff (prune), only a job
-- still as old and as idle as when it was listed.
-- KEYS: the job's hash, its other keys (submit lock last), the jobs index
-- ARGV: inc ('' : any), allowed statuses, job id, cutoff ('' : none)
-- The job leaves the queues in the same step (withdraw, guard.lua: its backlog, ring entries and
-- messages waiting on the broker queues), so a submit of the id that follows can never lose its
-- own backlog or messages to this delete.
-- Returns {how many keys existed, how many waiting messages went (backlog and queues)}, or -1
-- when refused (nothing changed).
local job, lock, index = KEYS[1], KEYS[#KEYS - 1], KEYS[#KEYS]
local s = redis.call('HMGET', job, 'status', 'inc', 'finished_at', 'updated_at', 'created_at')
if s[1] then
  if ARGV[1] ~= '' and s[2] and s[2] ~= ARGV[1] then return -1 end
  if not string.find(' ' .. ARGV[2] .. ' ', ' ' .. s[1] .. ' ', 1, true) then return -1 end
  if ARGV[4] ~= '' then
    local cutoff = tonumber(ARGV[4])
    if s[1] == 'submitting' then
      if redis.call('EXISTS', lock) == 1 or (tonumber(s[4] or s[5] or '0') or 0) >= cutoff then return -1 end
    elseif (tonumber(s[3] or '0') or 0) >= cutoff then
      return -1
    end
  end
end
local waiting = 0
if s[1] then waiting = redis.call('LLEN', job .. ':backlog') + withdraw(job) end
local n = 0
for k = 1, #KEYS - 1 do n = n + redis.call('DEL', KEYS[k]) end
redis.call('ZREM', index, ARGV[3])
return {n, waiting}
