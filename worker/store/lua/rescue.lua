-- Give back the messages of any jobs stranded on the queue of a mode nobody consumes any more
-- (its last worker died or left): the dispatcher tops a mode's queue up from the any jobs only
-- while a live worker consumes it, but what it already put there would wait for a worker of that
-- mode to come back.  Each such message goes back to the front of its job's backlog (oldest
-- first, as it was taken) and the job back into the any ring of its level, so the next dispatch
-- hands it to a mode with a live worker.  A message of a job that ended, is gone or is another
-- incarnation is dropped, as dispatch.lua drops such a job's backlog.  Messages of jobs pinned to
-- the mode (addressed to the queue itself) stay: only a worker of that mode may run them.
-- KEYS: per mode queue, three keys: the queue's list, its consumers (sorted set: worker ->
--       heartbeat expiry), the ring of the any queue of its level
-- ARGV: now, the job key prefix ('genq:job:'), then per mode queue the name of the any queue of
--       its level (what an any job's messages are addressed to: properties.delivery_info.routing_key)
-- A message is in exactly one place throughout: LREM and LPUSH in one atomic step.
-- Returns how many messages were given back.
local now, prefix = ARGV[1], ARGV[2]
local given = 0
for q = 1, #KEYS, 3 do
  local queue, ring, anyq = KEYS[q], KEYS[q + 2], ARGV[2 + (q + 2) / 3]
  if redis.call('ZCOUNT', KEYS[q + 1], '(' .. now, '+inf') == 0 and redis.call('LLEN', queue) > 0 then
    -- newest first (dispatch pushes on the left, kombu takes from the right): each one pushed on
    -- the left of its backlog in this order leaves the oldest leftmost, the next dispatched
    for _, raw in ipairs(redis.call('LRANGE', queue, 0, -1)) do
      local ok, msg = pcall(cjson.decode, raw)
      local id, to
      if ok and type(msg) == 'table' then
        if type(msg.headers) == 'table' then id = msg.headers.id end
        if type(msg.properties) == 'table' and type(msg.properties.delivery_info) == 'table' then
          to = msg.properties.delivery_info.routing_key
        end
      end
      if to == anyq and type(id) == 'string' then
        local rest, inc = string.match(id, '^(.*)@(%x+)$')
        if not rest then rest, inc = id, '' end
        local job = string.match(rest, '^(.*):[^:]*$')
        if job then
          local key = prefix .. job
          local s = redis.call('HMGET', key, 'status', 'inc')
          local status = s[1]
          redis.call('LREM', queue, 1, raw)
          if status and (s[2] or '') == inc and status ~= 'cancelling' and status ~= 'cancelled'
              and status ~= 'expired' and status ~= 'completed' then
            local backlog = key .. ':backlog'
            redis.call('LPUSH', backlog, raw)
            local pttl = redis.call('PTTL', key)
            if pttl > 0 then redis.call('PEXPIRE', backlog, pttl) end
            local entry = job .. '@' .. inc
            if not redis.call('LPOS', ring, entry) then redis.call('RPUSH', ring, entry) end
            given = given + 1
          end
        end
      end
    end
  end
end
return given
