-- Move chunk messages from jobs' backlogs to broker queues, one message per job in turn (round
-- robin between the jobs of a queue), until each queue holds its target depth.
-- KEYS: per broker queue to top up, five keys: the queue's list (what kombu BRPOPs), its ring of
--       jobs, its consumers (sorted set: worker -> heartbeat expiry), a shared ring (the ring of
--       the any queue of its priority level; its own ring again when none) and its turn counter
-- ARGV: the fewest messages to keep waiting, now, the job key prefix ('genq:job:')
-- A ring's entries are '<job>@<inc>' (append.lua puts them there): an entry of another
-- incarnation than the job's (its id deleted or lapsed and submitted again, perhaps with another
-- mode or priority) is dropped and nothing of the job is touched.
-- A queue with a shared ring takes turns between the jobs of both rings: over as many draws as
-- the two rings hold jobs, each job's turn comes once (the counter says whose), so a job pinned to
-- a mode and an any job of one priority share a worker chunk by chunk.  It draws from the
-- shared ring only while a live worker consumes it (an any job's chunks must not wait on the
-- queue of a mode nobody runs).
-- A message is always in exactly one of: a backlog, a broker queue, kombu's unacked hash; LMOVE
-- moves it atomically.  A job whose status is ending, final or gone leaves the ring and loses its
-- backlog (its items are counted as cancelled/expired by settle.lua, as for queued ones).  Job keys
-- are built here from the prefix (not declared in KEYS): a single Redis, never a cluster.
-- Returns how many messages were moved.
local min_depth, now, prefix = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local moved = 0
local targets = {}
for q = 1, #KEYS, 5 do
  local live = redis.call('ZCOUNT', KEYS[q + 2], '(' .. now, '+inf')
  local depth = live + 1
  if depth < min_depth then depth = min_depth end
  local shared = KEYS[q + 3]
  if shared == KEYS[q + 1] or live == 0 then shared = nil end
  targets[#targets + 1] = {queue = KEYS[q], own = KEYS[q + 1], shared = shared, turn = KEYS[q + 4],
                           depth = depth, n = redis.call('LLEN', KEYS[q])}
end
-- one turn per queue in each pass (queues sharing the any ring split its jobs' chunks between
-- them); each turn either moves a message (n grows) or removes a job from a ring: it ends
local busy = true
while busy do
  busy = false
  for _, t in ipairs(targets) do
    local lo = t.n < t.depth and redis.call('LLEN', t.own) or 0
    local ls = (t.n < t.depth and t.shared) and redis.call('LLEN', t.shared) or 0
    if lo + ls > 0 then
      busy = true
      local ring = t.own
      if lo == 0 or (ls > 0 and redis.call('INCR', t.turn) % (lo + ls) >= lo) then ring = t.shared end
      local entry = redis.call('LMOVE', ring, ring, 'RIGHT', 'LEFT')
      local job, inc = string.match(entry, '^(.*)@(%x*)$')
      if not job then job, inc = entry, '' end
      local backlog = prefix .. job .. ':backlog'
      local s = redis.call('HMGET', prefix .. job, 'status', 'inc')
      local status = s[1]
      if status and inc ~= '' and s[2] and s[2] ~= inc then
        redis.call('LREM', ring, 0, entry)  -- another incarnation's: the job now stored is not it
      elseif not status or status == 'cancelling' or status == 'cancelled' or status == 'expired'
          or status == 'completed' then
        redis.call('LREM', ring, 0, entry)
        redis.call('DEL', backlog)
      else
        local msg = redis.call('LMOVE', backlog, t.queue, 'LEFT', 'LEFT')
        if msg then
          t.n = t.n + 1
          moved = moved + 1
        end
        if redis.call('LLEN', backlog) == 0 then redis.call('LREM', ring, 0, entry) end
      end
    end
  end
end
return moved
