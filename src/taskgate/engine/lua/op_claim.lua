-- op claim: a worker takes the grant of a promoted task it received. Exactly one claim succeeds per
-- promotion; a second message for the same task (a hand-off sent twice) finds it claimed.
-- KEYS  [1] q  [2] d  [3] h  [4] g  [5] c  [6] m  (room.lua)  [7] the lease set of the policy ('' key ok)
-- ARGV  [1] now (0 = TIME)  [2] task id
-- Reply {status, grant, now}: 1 claimed (grant "<lease>|<lease_expires_at>|<reservation>|<reserved>|<valid_at>"),
--       2 claimed but its lease expired on the way (the slot is gone: admit again), 0 already claimed
--       (a duplicate: do not run), -1 unknown (never promoted, or purged: admit again).
local R = { q = KEYS[1], d = KEYS[2], h = KEYS[3], g = KEYS[4], c = KEYS[5], m = KEYS[6] }
local now = tg_now(ARGV[1])
local id = ARGV[2]
if not redis.call('ZSCORE', R.h, id) then
  if redis.call('ZSCORE', R.c, id) then return { 0, '' } end
  return { -1, '' }
end
local grant = redis.call('HGET', R.g, id) or '|0||0|0'
local rec = redis.call('HGET', R.d, id)
if rec then  -- how long it waited, parked to claimed: one more count in its bucket of the wait histogram
  local _, _, at = room_parse(rec)
  local wait = math.max(0, now - (at or now))
  local b = #ROOM_WAIT_BUCKETS_MS + 1
  for i, le in ipairs(ROOM_WAIT_BUCKETS_MS) do
    if wait <= le then b = i; break end
  end
  redis.call('HINCRBY', R.m, 'h' .. b, 1)
  redis.call('HINCRBY', R.m, 'hs', wait)
end
redis.call('ZREM', R.h, id)
redis.call('HDEL', R.g, id)
redis.call('HDEL', R.d, id)
redis.call('ZADD', R.c, now, id)
redis.call('ZREMRANGEBYSCORE', R.c, '-inf', now - ROOM_CLAIMED_KEEP_MS)
tg_pexpire(R.c, ROOM_CLAIMED_KEEP_MS)
redis.call('HINCRBY', R.m, 'ncl', 1)
local lease = string.match(grant, '^(.*)|[^|]*|[^|]*|[^|]*|[^|]*$')
if lease ~= nil and lease ~= '' then
  local exp = tonumber(redis.call('ZSCORE', KEYS[7], lease))
  if exp == nil or exp <= now then return { 2, grant, now } end
end
return { 1, grant, now }
