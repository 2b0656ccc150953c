-- Move chunk messages from jobs' backlogs to broker queues, one message per job in turn (round
-- robin between the jobs of a queue), until each queue holds its target depth.
-- KEYS: per broker queue, three keys: the queue's list (what kombu BRPOPs), its ring of jobs,
--       its consumers (sorted set: worker -> heartbeat expiry)
-- ARGV: the fewest messages to keep waiting, now, the job key prefix ('genq:job:'), then job ids
--       to put in the FIRST queue's ring (a publish: their backlogs just grew)
-- A message is always in exactly one of: a backlog, a broker queue, kombu's unacked hash; LMOVE
-- moves it atomically.  A job whose status is ending, final or gone leaves the ring and loses its
-- backlog (its items are counted as cancelled/expired by settle.lua, as for queued ones).  Job keys
-- are built here from the prefix (not declared in KEYS): a single Redis, never a cluster.
-- Returns how many messages were moved.
local min_depth, now, prefix = tonumber(ARGV[1]), ARGV[2], ARGV[3]
if #KEYS >= 2 then
  for i = 4, #ARGV do
    -- a new job goes to the ring's right end: it is served next
    if not redis.call('LPOS', KEYS[2], ARGV[i]) then redis.call('RPUSH', KEYS[2], ARGV[i]) end
  end
end
local moved = 0
for q = 1, #KEYS, 3 do
  local queue, ring, consumers = KEYS[q], KEYS[q + 1], KEYS[q + 2]
  local depth = redis.call('ZCOUNT', consumers, '(' .. now, '+inf') + 1
  if depth < min_depth then depth = min_depth end
  local n = redis.call('LLEN', queue)
  -- each turn either moves a message (n grows) or removes a job from the ring: it ends
  while n < depth do
    local job = redis.call('LMOVE', ring, ring, 'RIGHT', 'LEFT')
    if not job then break end
    local backlog = prefix .. job .. ':backlog'
    local status = redis.call('HGET', prefix .. job, 'status')
    if not status or status == 'cancelling' or status == 'cancelled' or status == 'expired'
        or status == 'completed' then
      redis.call('LREM', ring, 0, job)
      redis.call('DEL', backlog)
    else
      local msg = redis.call('LMOVE', backlog, queue, 'LEFT', 'LEFT')
      if msg then
        n = n + 1
        moved = moved + 1
      end
      if redis.call('LLEN', backlog) == 0 then redis.call('LREM', ring, 0, job) end
    end
  end
end
return moved
