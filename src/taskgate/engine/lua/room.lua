-- Fragment: the waiting room of one (policy, key). Work that may not run yet waits here, in order, and
-- leaves it only admitted (its grant taken by the same script that promotes it).
-- Keys (one hash slot: the decision's own tag):
--   q  sorted set  task id -> order: the head of each fair key S * 2^20 + (arrival seq mod 2^20), every other
--                  task ROOM_TAIL + seq (work without a fair key) or ROOM_FAIR + seq (with one: also in p)
--                  (see "Order" below); ZCARD q is the number waiting
--   d  hash        task id -> "<cost> <tokens> <parked_at>[ <fair key>]\n<payload>"  (payload: what re-sends
--                  the task)
--   h  sorted set  task id -> hand-off deadline: promoted (admitted), on its way to a worker
--   g  hash        task id -> grant "<lease>|<lease_expires_at>|<reservation id>|<reserved tokens>|<valid_at>"
--   c  sorted set  task id -> when its grant was claimed (recognises a duplicate message; trimmed by age)
--   m  hash        seq (arrival counter), np (parked), nsp (of which parked when sent), npr (promoted),
--                  ncl (claimed); the wait histogram of claimed tasks (parked -> claimed): h1 .. h<n+1>
--                  counts per bucket of ROOM_WAIT_BUCKETS_MS (the last: longer), hs the sum (ms);
--                  v the virtual time V (ticks)
--   p  sorted set  the waiting tasks with a fair key that are not its head, all score 0, member
--                  "<fair key>\31<seq, 16 digits>\31<task id>": by fair key, then arrival (ZRANGEBYLEX)
--   f  hash        "t:<fair key>" -> its finish tag F (ticks), "n:<fair key>" -> its tasks waiting
--   s  hash        grants ("starts") per fair key in the current window of ROOM_STARTS_MS: w its start
--                  (epoch-ms, engine clock), "k:<fair key>" (the fair key "" for work without one) -> how many
--                  were admitted or promoted, x those of fair keys past the first ROOM_STARTS_KEYS of the
--                  window (for operators: `taskgate top`, the exporter; see room_started)
--   o  hash        the same for the window before (s renamed when its window ends)
--
-- Order: start-time fair queueing (Goyal, Vin, Cheng 1996) across *fair keys* inside the room, one FIFO per
-- fair key (the fair key "" for work declared without one). Only the head of each fair key is tagged, when
-- it becomes the head (on arrival to a fair key with nothing waiting, or when the one before it is
-- promoted): start tag S = max(V, F) and F := S + c/w (cost c, weight w in force at that moment: a changed
-- weight applies from each fair key's next head on, not only to later arrivals); promote takes the least
-- (S, arrival) and sets V := its S. This is SFQ exactly: a fair key that stays backlogged is tagged
-- S = F of the one before it, as if tagged on arrival.
-- Invariants: every fair key with work waiting has exactly one head in q, scored below ROOM_TAIL; so q's
-- first member is the least start tag (ties: the earlier arrival, within 2^20 arrivals), each fair key is served in arrival
-- order, and without fair keys (one flow) the room is FIFO, as before fair keys existed. Every S >= V. A
-- fair key of weight w that stays backlogged receives, over any stretch, its share w / (sum of the
-- backlogged fair keys' weights) of the tasks promoted, within one task's c/w; a fair key alone waiting
-- gets every slot the policy admits (work-conserving: the head is simply q's first member). When the room
-- is empty nothing is owed: a task parking into an empty room resets V, the tags and p, which also bounds
-- S by one busy period (scores stay exact while S < 2^32 ticks, i.e. 4.2 million units of c/w per busy
-- period; past that the heads' order degrades to the member order, never loses work).

local function room_slice(t, from)
  local out = {}
  for i = from, #t do out[#out + 1] = t[i] end
  return out
end

local function room_parse(rec)
  local cost, tokens, at, fk, body = string.match(rec, '^(%d+) (%d+) (%d+) ?([^\n]*)\n(.*)$')
  return tonumber(cost), tonumber(tokens), tonumber(at), body, fk
end

local function room_expire(R, ttl)
  for _, k in ipairs({ R.q, R.d, R.h, R.g, R.m, R.p, R.f }) do tg_pexpire(k, ttl) end
end

-- Starts per fair key, kept bounded: two windows (s, o) of at most ROOM_STARTS_KEYS + 2 fields each, both
-- expiring two windows after the last grant. Readers take o's counts weighted by the part of its window
-- still inside the last ROOM_STARTS_MS, plus s's (a sliding estimate of the starts over the last window).
local ROOM_STARTS_MS = 60000
local ROOM_STARTS_KEYS = 1000

-- Roll the windows to the one holding `now` (a clock going back keeps counting in the current one).
local function room_window(R, now)
  local start = now - now % ROOM_STARTS_MS
  local w = tonumber(redis.call('HGET', R.s, 'w') or '-1')
  if w >= start then return end
  if w >= 0 and w == start - ROOM_STARTS_MS then
    redis.call('RENAME', R.s, R.o)
  else
    redis.call('DEL', R.s, R.o)
  end
  redis.call('HSET', R.s, 'w', start)
end

-- `n` grants of fair key fk in the current window (room_window first).
local function room_started(R, fk, n)
  local f = 'k:' .. fk
  if redis.call('HEXISTS', R.s, f) == 0 and redis.call('HLEN', R.s) > ROOM_STARTS_KEYS then f = 'x' end
  redis.call('HINCRBY', R.s, f, n)
end

local function room_started_expire(R)
  tg_pexpire(R.s, 2 * ROOM_STARTS_MS)
  tg_pexpire(R.o, 2 * ROOM_STARTS_MS)
end

local ROOM_TICKS = 1000  -- virtual-time ticks per unit of cost/weight
local ROOM_SEQ = 1048576  -- 2^20: arrival bits under a head's start tag in q's score
local ROOM_TAIL = 4503599627370496  -- 2^52: the score of a task that is not the head, + seq (no fair key)
local ROOM_FAIR = 6755399441055744  -- 2^52 + 2^51: likewise, for a task with a fair key (also in p)

local function room_num(x)
  return string.format('%.0f', x)
end

local function room_member(fk, seq, id)
  return fk .. '\31' .. string.format('%016d', seq) .. '\31' .. id
end

-- Tag a new head (arrival `seq`, cost c) of fair key `fk` of weight w: its score in q (F advances).
local function room_tag(R, fk, w, c, seq)
  local v = tonumber(redis.call('HGET', R.m, 'v') or '0')
  local s = math.max(v, tonumber(redis.call('HGET', R.f, 't:' .. fk) or '0'))
  local step = math.max(1, math.floor(c * ROOM_TICKS / w + 0.5))
  redis.call('HSET', R.f, 't:' .. fk, room_num(s + step))
  return room_num(math.min(s * ROOM_SEQ + seq % ROOM_SEQ, ROOM_TAIL - 1))
end

-- Park `id` (fair key fk, weight w, cost c) as arrival `seq`; `empty`: nothing waits in the room.
local function room_park(R, id, fk, w, c, seq, empty)
  if empty then
    redis.call('DEL', R.f, R.p)
    redis.call('HSET', R.m, 'v', 0)
  end
  local score
  if redis.call('HINCRBY', R.f, 'n:' .. fk, 1) == 1 then
    score = room_tag(R, fk, w, c, seq)
  elseif fk == '' then  -- without a fair key q itself keeps the arrival order behind the head
    score = room_num(ROOM_TAIL + seq)
  else
    redis.call('ZADD', R.p, 0, room_member(fk, seq, id))
    score = room_num(ROOM_FAIR + seq)
  end
  redis.call('ZADD', R.q, score, id)
end

-- `id` of fair key fk, scored `score` in q, was promoted (and removed from q): V := its start tag, and the
-- next of its fair key (if any) becomes the head, tagged at the weight in force (weight(fk)).
local function room_next(R, id, fk, score, weight)
  local s = tonumber(score)
  local head = s < ROOM_TAIL
  if head then
    redis.call('HSET', R.m, 'v', room_num(math.floor(s / ROOM_SEQ)))
  elseif s >= ROOM_FAIR then  -- not a head (its fair key's head was lost): promoted in arrival order
    redis.call('ZREM', R.p, room_member(fk, s - ROOM_FAIR, id))
  end
  if redis.call('HINCRBY', R.f, 'n:' .. fk, -1) <= 0 then
    redis.call('HDEL', R.f, 'n:' .. fk)
    return
  end
  if not head then return end
  local nid, seq
  if fk == '' then
    local nxt = redis.call('ZRANGEBYSCORE', R.q, room_num(ROOM_TAIL), '(' .. room_num(ROOM_FAIR), 'WITHSCORES',
      'LIMIT', 0, 1)
    if nxt[1] == nil then return end
    nid, seq = nxt[1], tonumber(nxt[2]) - ROOM_TAIL
  else
    local nxt = redis.call('ZRANGEBYLEX', R.p, '[' .. fk .. '\31', '(' .. fk .. ' ', 'LIMIT', 0, 1)[1]
    if nxt == nil then return end
    redis.call('ZREM', R.p, nxt)
    local sq
    sq, nid = string.match(string.sub(nxt, #fk + 2), '^(%d+)\31(.*)$')
    seq = tonumber(sq)
  end
  local rec = redis.call('HGET', R.d, nid)
  if rec == nil then return end
  local c = tonumber(string.match(rec, '^(%d+)'))
  redis.call('ZADD', R.q, 'XX', room_tag(R, fk, weight(fk), c, seq), nid)
end

-- Upper bounds of the wait histogram's buckets (ms); keep in step with backends/waiting.py WAIT_BUCKETS_S.
local ROOM_WAIT_BUCKETS_MS = { 100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 1800000, 3600000 }

-- A claimed id is remembered this long (a duplicate of its message arriving later is recognised).
local ROOM_CLAIMED_KEEP_MS = 86400000
