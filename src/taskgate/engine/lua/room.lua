-- Fragment: the waiting room of one (policy, key). Work that may not run yet waits here, in order, and
-- leaves it only admitted (its grant taken by the same script that promotes it).
-- Keys (one hash slot: the decision's own tag):
--   q  sorted set  task id -> service order: its start tag S and arrival (see "Order" below)
--   d  hash        task id -> "<cost> <tokens> <parked_at>\n<payload>"  (payload: what re-sends the task)
--   h  sorted set  task id -> hand-off deadline: promoted (admitted), on its way to a worker
--   g  hash        task id -> grant "<lease>|<lease_expires_at>|<reservation id>|<reserved tokens>|<valid_at>"
--   c  sorted set  task id -> when its grant was claimed (recognises a duplicate message; trimmed by age)
--   m  hash        seq (arrival counter), np (parked), nsp (of which parked when sent), npr (promoted),
--                  ncl (claimed); the wait histogram of claimed tasks (parked -> claimed): h1 .. h<n+1>
--                  counts per bucket of ROOM_WAIT_BUCKETS_MS (the last: longer), hs the sum (ms);
--                  v the virtual time V (ticks)
--   f  sorted set  fair key -> its finish tag F_f (ticks); a tag <= V is the same as none, and is trimmed
--
-- Order: start-time fair queueing (Goyal et al., SFQ) across *fair keys* inside the room. A task of fair
-- key f, weight w > 0 and cost c parks with the start tag S = max(V, F_f) and sets F_f := S + c/w; on
-- promotion V := S of the promoted head. q is ordered by (S, arrival): its score is S * 2^20 + (arrival
-- seq mod 2^20), exact in a double while S < 2^33 ticks (ROOM_TICKS ticks per unit of c/w).
-- Invariants: within one fair key S strictly increases with arrival (c/w > 0), so each fair key is served
-- FIFO, and work without a fair key (the fair key "": one flow) is served exactly in arrival order, as
-- before fair keys existed; every S >= V, so the head always has the least start tag and a backlogged key
-- of weight w receives, over any stretch where keys stay backlogged, service within one task's c/w of
-- w / (sum of the backlogged weights) of the total. A key alone waiting gets every slot the policy admits
-- (the head is simply the least score: work-conserving). When the room is empty nothing is owed: a task
-- parking into an empty room resets V and the finish tags, which also bounds S by one busy period.

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
  for _, k in ipairs({ R.q, R.d, R.h, R.g, R.m, R.f }) do tg_pexpire(k, ttl) end
end

local ROOM_TICKS = 1000  -- virtual-time ticks per unit of cost/weight
local ROOM_SEQ = 1048576  -- 2^20: arrival bits under the start tag in q's score

-- The score in q of a task of fair key `fk` (weight w, cost c) arriving as `seq` (updates F_fk).
local function room_start(R, fk, w, c, seq, empty)
  if empty then
    redis.call('DEL', R.f)
    redis.call('HSET', R.m, 'v', 0)
  end
  local v = tonumber(redis.call('HGET', R.m, 'v') or '0')
  local s = math.max(v, tonumber(redis.call('ZSCORE', R.f, fk) or '0'))
  local step = math.max(1, math.floor(c * ROOM_TICKS / w + 0.5))
  redis.call('ZADD', R.f, string.format('%.0f', s + step), fk)
  return string.format('%.0f', s * ROOM_SEQ + seq % ROOM_SEQ)
end

-- Promotion of the head whose score in q is `score`: V := its start tag; finish tags <= V are trimmed.
local function room_advance(R, score)
  local v = math.floor(tonumber(score) / ROOM_SEQ)
  redis.call('HSET', R.m, 'v', string.format('%.0f', v))
  redis.call('ZREMRANGEBYSCORE', R.f, '-inf', string.format('%.0f', v))
end

-- Upper bounds of the wait histogram's buckets (ms); keep in step with backends/waiting.py WAIT_BUCKETS_S.
local ROOM_WAIT_BUCKETS_MS = { 100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 1800000, 3600000 }

-- A claimed id is remembered this long (a duplicate of its message arriving later is recognised).
local ROOM_CLAIMED_KEEP_MS = 86400000
