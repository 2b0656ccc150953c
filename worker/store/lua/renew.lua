-- Renew a worker's lease on the chunk it runs: move kombu's delivery time of its message to now
-- (kombu's unacked index), and the time in the job's running entry when that entry is still this
-- worker's.  KEYS: kombu's unacked index, the job's running hash; ARGV: delivery tag, chunk,
-- "worker|" (the entry's prefix), now.
-- Returns 1 when the lease was renewed, 0 when the message is no longer unacknowledged (its lease
-- lapsed and it was put back on its queue, or another delivery of it was acknowledged).
local index, running = KEYS[1], KEYS[2]
local tag, cid, holder, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local entry = redis.call('HGET', running, cid)
if entry and string.sub(entry, 1, #holder) == holder then
  redis.call('HSET', running, cid, holder .. now)
end
if not redis.call('ZSCORE', index, tag) then return 0 end
redis.call('ZADD', index, 'XX', now, tag)
return 1
