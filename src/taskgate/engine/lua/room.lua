-- Fragment: the waiting room of one (policy, key). Work that may not run yet waits here, in order, and
-- leaves it only admitted (its grant taken by the same script that promotes it).
-- Keys (one hash slot: the decision's own tag):
--   q  sorted set  task id -> arrival sequence (FIFO order)
--   d  hash        task id -> "<cost> <tokens> <parked_at>\n<payload>"  (payload: what re-sends the task)
--   h  sorted set  task id -> hand-off deadline: promoted (admitted), on its way to a worker
--   g  hash        task id -> grant "<lease>|<lease_expires_at>|<reservation id>|<reserved tokens>|<valid_at>"
--   c  sorted set  task id -> when its grant was claimed (recognises a duplicate message; trimmed by age)
--   m  hash        seq (arrival counter), np (parked), nsp (of which parked when sent), npr (promoted),
--                  ncl (claimed); the wait histogram of claimed tasks (parked -> claimed): h1 .. h<n+1>
--                  counts per bucket of ROOM_WAIT_BUCKETS_MS (the last: longer), hs the sum (ms)

local function room_slice(t, from)
  local out = {}
  for i = from, #t do out[#out + 1] = t[i] end
  return out
end

local function room_parse(rec)
  local cost, tokens, at, body = string.match(rec, '^(%d+) (%d+) (%d+)\n(.*)$')
  return tonumber(cost), tonumber(tokens), tonumber(at), body
end

local function room_expire(R, ttl)
  for _, k in ipairs({ R.q, R.d, R.h, R.g, R.m }) do tg_pexpire(k, ttl) end
end

-- Upper bounds of the wait histogram's buckets (ms); keep in step with backends/waiting.py WAIT_BUCKETS_S.
local ROOM_WAIT_BUCKETS_MS = { 100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 1800000, 3600000 }

-- A claimed id is remembered this long (a duplicate of its message arriving later is recognised).
local ROOM_CLAIMED_KEEP_MS = 86400000
