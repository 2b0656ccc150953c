-- Every input is stored and valid: the final spec and total, while still this incarnation and
-- 'submitting'.  KEYS: job; ARGV: inc, allowed statuses, spec json, total, now
local status, refused = guard(KEYS[1], ARGV[1], ARGV[2])
if not status then return refused end
redis.call('HSET', KEYS[1], 'spec', ARGV[3], 'total', ARGV[4], 'updated_at', ARGV[5])
return 1
