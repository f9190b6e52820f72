-- op promote: hand the head of the waiting room its grant, in the room's order (room.lua: least start tag,
-- then arrival; FIFO without fair keys), while the policy admits it. V advances to each promoted start tag.
-- Each promoted task is admitted by the very admit of op_admit.lua (rate slot consumed, lease taken,
-- tokens reserved) and moves to the hand-off set until a worker claims it; a hand-off not claimed by its
-- deadline (the promoter died before sending it) is handed out again, with the same grant.
-- KEYS  [1] q  [2] d  [3] h  [4] g  [5] m  [6] p  [7] f  [8] s  [9] o  (room.lua)  [10 .. 9+nr] reservation
--       keys (one per escrowed promotion, in order)  [10+nr ..] the admit KEYS (op_admit.lua; its reservation
--       key is replaced)
-- ARGV  [1] now (0 = TIME)  [2] most to promote  [3] hand-off ms  [4] room ttl ms  [5] lead ms: a plain
--       gcra policy books slots up to this far ahead (0: none)  [6] nr  [7] default weight  [8] nw
--       [9 .. 8+nr] reservation ids  [9+nr .. 8+nr+2*nw] fair key, weight (the weights in force that are
--       not the default)  [9+nr+2*nw ..] the admit ARGV (holder "" = no concurrency, else any)
-- Reply {next_due, depth, n, id_1, grant_1, payload_1, ...}: next_due = when the head may be promoted,
--       or, with nothing waiting, when the first hand-off still unclaimed falls due to go out again (0: the
--       room is empty and nothing is on its way), depth = still waiting. A grant booked ahead is valid from its valid_at:
--       the worker waits for it (at most `lead`), so a promoter that runs late loses no slot.
local R = { q = KEYS[1], d = KEYS[2], h = KEYS[3], g = KEYS[4], m = KEYS[5], p = KEYS[6], f = KEYS[7] }
R.s, R.o = KEYS[8], KEYS[9]
local now = tg_now(ARGV[1])
local most, handoff, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lead, nr = tonumber(ARGV[5]), tonumber(ARGV[6])
local default_weight, nw = tonumber(ARGV[7]), tonumber(ARGV[8])
local weights = {}
for i = 1, nw do weights[ARGV[7 + nr + 2 * i]] = tonumber(ARGV[8 + nr + 2 * i]) end
local function weight(fk) return weights[fk] or default_weight end
local AK, AA = room_slice(KEYS, 10 + nr), room_slice(ARGV, 9 + nr + 2 * nw)
AA[1] = now
if lead > 0 then AA[9] = '1'; AA[#AA] = lead end  -- book (gcra's horizon is the last admit argument)
local conc = AA[4] ~= ''
local out = { 0, 0, 0 }
local n = 0
-- hand-offs past their deadline go out again (same grant)
local stale = redis.call('ZRANGEBYSCORE', R.h, '-inf', now, 'LIMIT', 0, most)
for _, id in ipairs(stale) do
  local grant, rec = redis.call('HGET', R.g, id), redis.call('HGET', R.d, id)
  if grant and rec then
    redis.call('ZADD', R.h, now + handoff, id)
    local _, _, _, body = room_parse(rec)
    out[#out + 1] = id; out[#out + 1] = grant; out[#out + 1] = body
    n = n + 1
  else
    redis.call('ZREM', R.h, id); redis.call('HDEL', R.g, id); redis.call('HDEL', R.d, id)
  end
end
local used, next_due = 0, 0
local started = {}  -- grants per fair key in this call (starts, room.lua's s)
while n < most do
  local top = redis.call('ZRANGE', R.q, 0, 0, 'WITHSCORES')
  local head, score = top[1], top[2]
  if head == nil then break end
  local rec = redis.call('HGET', R.d, head)
  if rec == nil then
    redis.call('ZREM', R.q, head)  -- purged payload: nothing to send
  else
    local cost, tokens, _, body, fk = room_parse(rec)
    local K, A = room_slice(AK, 1), room_slice(AA, 1)
    A[2], A[3] = cost, tokens
    local rid = ''
    if A[8] == 'e' and tokens > 0 then
      if used >= nr then break end
      used = used + 1
      K[6], rid = KEYS[9 + used], ARGV[8 + used]
    end
    if conc then A[4] = head .. '.' .. redis.call('HINCRBY', R.m, 'seq', 1) end
    local r = tg_admit(K, A)
    local valid_at = now
    if r[1] ~= 1 and r[6] == 1 then valid_at = now + r[5] end  -- booked ahead: the slot is its grant
    if r[1] ~= 1 and r[6] ~= 1 then
      if rid ~= '' then used = used - 1 end
      next_due = now + math.max(0, r[5] - lead)
      break
    end
    if r[11] == 0 then rid = '' end
    local grant = r[9] .. '|' .. r[10] .. '|' .. rid .. '|' .. r[11] .. '|' .. valid_at
    redis.call('ZREM', R.q, head)
    room_next(R, head, fk, score, weight)
    started[fk or ''] = (started[fk or ''] or 0) + 1
    redis.call('ZADD', R.h, now + handoff, head)
    redis.call('HSET', R.g, head, grant)
    redis.call('HINCRBY', R.m, 'npr', 1)
    out[#out + 1] = head; out[#out + 1] = grant; out[#out + 1] = body
    n = n + 1
  end
end
if next(started) ~= nil then
  room_window(R, now)
  for fk, k in pairs(started) do room_started(R, fk, k) end
  room_started_expire(R)
end
local depth = redis.call('ZCARD', R.q)
if depth > 0 and next_due == 0 then next_due = now end
if depth == 0 then  -- nothing waits: the room stays due while a hand-off may have to go out again
  local first = redis.call('ZRANGE', R.h, 0, 0, 'WITHSCORES')
  next_due = tonumber(first[2] or 0)
end
if depth > 0 or n > 0 then room_expire(R, ttl) end
out[1], out[2], out[3] = next_due, depth, n
return out
