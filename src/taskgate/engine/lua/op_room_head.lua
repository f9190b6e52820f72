-- op room_head: when the task at the head of a room (the next to be served) was parked (read only, for
-- operators).
-- KEYS  [1] q  [2] d  (room.lua)
-- ARGV  none
-- Reply epoch-ms the head was parked (0: the room is empty).
local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if not head then return 0 end
local rec = redis.call('HGET', KEYS[2], head)
if not rec then return 0 end
return tonumber(string.match(rec, '^%d+ %d+ (%d+)')) or 0
