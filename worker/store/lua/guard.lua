-- Put before every script (worker/store/base.py): the guard of the job's state table.
-- guard(job, inc, allowed) returns the job's status when the job exists, is incarnation `inc`
-- ('' : any) and its status is one of `allowed` (space-separated statuses, given by Python from
-- worker.core.lifecycle.allowed); else nil and the refusal to return, an error reply
-- 'GENQ_REFUSED <status>' ('absent' when there is no such job, or it is another incarnation).
-- The check and the change it guards are then one atomic step.
local function guard(job, inc, allowed)
  local s = redis.call('HMGET', job, 'status', 'inc')
  local status = s[1]
  if not status or (inc ~= '' and s[2] and s[2] ~= inc) then
    return nil, redis.error_reply('GENQ_REFUSED absent')
  end
  if not string.find(' ' .. allowed .. ' ', ' ' .. status .. ' ', 1, true) then
    return nil, redis.error_reply('GENQ_REFUSED ' .. status)
  end
  return status
end

-- withdraw(job): take the job out of the queues in the step that ends it (cancel, expiry) or
-- finishes it (completed: no item is pending, so no message of it has anything left to run, and a
-- retry that reopens it publishes its own): its backlog, its entries in the rings and its
-- messages waiting on the broker queues.  The queues and rings are the job's 'route', written
-- by its submit (a job without one keeps what a worker taking it drops).  Messages a worker holds
-- (kombu's unacked) are left to it.  Every incarnation's messages of the id go: an older one's are
-- dropped by whoever takes them anyway.  Returns how many queued messages were removed.
local function withdraw(job)
  -- reads first: a script stopped by an error (an ACL refusing a command) has written nothing
  local h = redis.call('HMGET', job, 'route', 'inc')
  redis.call('DEL', job .. ':backlog')
  local raw = h[1]
  if not raw then return 0 end
  local route = cjson.decode(raw)
  local prefix = route.id .. ':'
  local entry = route.id .. '@' .. (h[2] or '')
  for _, ring in ipairs(route.rings) do
    redis.call('LREM', ring, 0, entry)
  end
  local removed = 0
  for _, queue in ipairs(route.queues) do
    for _, msg in ipairs(redis.call('LRANGE', queue, 0, -1)) do
      local ok, envelope = pcall(cjson.decode, msg)
      local tid = ok and type(envelope) == 'table' and type(envelope.headers) == 'table'
        and envelope.headers.id
      if type(tid) == 'string' and string.sub(tid, 1, #prefix) == prefix then
        removed = removed + redis.call('LREM', queue, 1, msg)
      end
    end
  end
  return removed
end
