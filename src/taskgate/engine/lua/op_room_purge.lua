-- op room_purge: remove every task waiting in the room (not those promoted: they hold grants).
-- KEYS  [1] q  [2] d  [3] p  [4] f  [5] s  [6] o  (room.lua; the starts per fair key, s and o, are kept)
-- ARGV  none
-- Reply the number of tasks removed.
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for i = 1, #ids, 500 do
  redis.call('HDEL', KEYS[2], unpack(ids, i, math.min(i + 499, #ids)))
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
return #ids
