-- op reset: forget every state of one (policy, key). KEYS: the keys to delete. ARGV: none. Reply: count.
return redis.call('DEL', unpack(KEYS))
