-- The lease of a job's one `genq collect --follow`: take it, renew it, or hand it back.
-- KEYS: the lease key.  ARGV: op ('take', 'renew', 'release'), holder, ttl ms, and for 'take' a
-- holder to replace (a dead collector of this machine, found by its pid) or ''.
-- Returns 1 when the caller holds (or released) the lease, else the current holder.
local key, op, holder, ttl, replace = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local current = redis.call('GET', key)
if op == 'release' then
  if current == holder then redis.call('DEL', key) end
  return 1
end
if current == false or current == holder or (op == 'take' and replace ~= '' and current == replace) then
  redis.call('SET', key, holder, 'PX', ttl)
  return 1
end
return current
