-- Record chunks that are not plain ranges (split children, retry rounds), first record wins,
-- while the job is this incarnation; they live as long as a partial job does.
-- KEYS: job, chunks; ARGV: inc, allowed statuses, split parent ('' : none), then chunk id, json pairs
-- Returns the ids this call created.
local status, refused = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return refused end
local made = {}
for i = 4, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then made[#made + 1] = ARGV[i] end
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[3], '[]') end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then redis.call('PEXPIRE', KEYS[2], pttl) end
return made
