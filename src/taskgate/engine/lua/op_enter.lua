-- op enter: admit a task, or park it in the waiting room of its (policy, key) -- one atomic call.
-- A task is admitted only when nobody waits (arrivals never overtake parked work); a parked task takes
-- its place in the room's order (room.lua: start-time fair queueing across fair keys, FIFO within one).
-- KEYS  [1] q  [2] d  [3] h  [4] g  [5] c  [6] m  [7] p  [8] f  [9] s  [10] o  (room.lua)  [11 ..] the admit
--       KEYS (op_admit.lua)
-- ARGV  [1] task id  [2] payload  [3] park_over_ms: a denial whose wait is at most this is returned, not
--       parked (-1: always park)  [4] room ttl ms  [5] dedupe 1|0  [6] hand-off ms: 0, or admitted work is
--       handed off like promoted work (when it is sent: the worker claims the grant)  [7] fair key ("":
--       none; no newline nor \31)  [8] its weight (> 0; read by the caller from the policy and the store)
--       [9 ..] the admit ARGV (op_admit.lua)
-- Reply {status, depth, <the admit reply (11 fields)>}: status 1 admitted, 3 admitted and handed off,
--       0 denied (not parked: a short wait), 2 parked (depth = waiting after it joined; with the admit
--       reply when it was the first: its retry_after is when the room is due), -1 already waiting or
--       promoted (a duplicate message), -2 already claimed (ran: a duplicate).
local R = { q = KEYS[1], d = KEYS[2], h = KEYS[3], g = KEYS[4], c = KEYS[5], m = KEYS[6] }
R.p, R.f, R.s, R.o = KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local id, payload, park_over, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local handoff = tonumber(ARGV[6])
local fair_key, weight = ARGV[7], tonumber(ARGV[8])
local AK, AA = room_slice(KEYS, 11), room_slice(ARGV, 9)
local now = tg_now(AA[1])
AA[1] = now
if ARGV[5] == '1' then
  if redis.call('ZSCORE', R.q, id) or redis.call('ZSCORE', R.h, id) then return { -1, redis.call('ZCARD', R.q) } end
  if redis.call('ZSCORE', R.c, id) then return { -2, 0 } end
end
local depth = redis.call('ZCARD', R.q)
local r = nil
if depth == 0 then
  r = tg_admit(AK, AA)
  if r[1] == 1 then  -- a start of its fair key
    room_window(R, now)
    room_started(R, fair_key, 1)
    room_started_expire(R)
  end
  if r[1] == 1 and handoff > 0 then
    local rid = ''
    if r[11] > 0 then rid = string.match(AK[6], ':rv:([^:]*)$') end
    redis.call('ZADD', R.h, now + handoff, id)
    redis.call('HSET', R.g, id, r[9] .. '|' .. r[10] .. '|' .. rid .. '|' .. r[11] .. '|' .. now)
    redis.call('HSET', R.d, id, AA[2] .. ' ' .. AA[3] .. ' ' .. now .. '\n' .. payload)
    room_expire(R, ttl)
    return { 3, 0, unpack(r) }
  end
  if r[1] == 1 then return { 1, 0, unpack(r) } end
  if park_over >= 0 and r[5] <= park_over then return { 0, 0, unpack(r) } end
end
local seq = redis.call('HINCRBY', R.m, 'seq', 1)
redis.call('HINCRBY', R.m, 'np', 1)
if handoff > 0 then redis.call('HINCRBY', R.m, 'nsp', 1) end  -- parked when sent: it never was on the broker
local tag = ''
if fair_key ~= '' then tag = ' ' .. fair_key end
redis.call('HSET', R.d, id, AA[2] .. ' ' .. AA[3] .. ' ' .. now .. tag .. '\n' .. payload)
room_park(R, id, fair_key, weight, tonumber(AA[2]), seq, depth == 0)
room_expire(R, ttl)
if r == nil then return { 2, depth + 1 } end
return { 2, depth + 1, unpack(r) }
