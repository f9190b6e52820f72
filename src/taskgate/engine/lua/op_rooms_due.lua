-- op rooms_due: the rooms whose head may be promoted now, taken for `lease` ms by this promoter (so N
-- promoters share the work; a promoter that dies leaves its rooms due again after the lease).
-- KEYS  [1] the index of rooms (sorted set room -> due epoch-ms)
-- ARGV  [1] now (0 = TIME)  [2] most  [3] lease ms
-- Reply {now, next_due (0: no room), room_1, room_2, ...}
local now = tg_now(ARGV[1])
local rooms = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, room in ipairs(rooms) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), room) end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local out = { now, tonumber(first[2] or 0) }
for _, room in ipairs(rooms) do out[#out + 1] = room end
if #rooms > 0 or first[2] then tg_pexpire(KEYS[1], 7 * 86400000) end
return out
