-- Claim chunks for publishing, one bit per chunk: a chunk is published by whoever flips its bit.
-- KEYS: job, claims bitmap; ARGV: inc, allowed statuses, then chunk numbers.
-- Returns the numbers this call claimed (a refusal when the job may not publish).
local status, refused = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return refused end
local pttl = redis.call('PTTL', KEYS[1])
local won = {}
for i = 3, #ARGV do
  if redis.call('SETBIT', KEYS[2], ARGV[i], 1) == 0 then won[#won + 1] = ARGV[i] end
end
if pttl > 0 then redis.call('PEXPIRE', KEYS[2], pttl) end
return won
