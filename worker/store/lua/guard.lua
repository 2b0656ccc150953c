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
