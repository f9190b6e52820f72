-- op heartbeat: renew many leases of one lease set in one call.
-- KEYS  [1] leases  [2] lease meta
-- ARGV  [1] now (0 = TIME)  [2] lease ttl ms  [3..] lease members
-- Reply {live members..., '|', reclaimed members..., next_deadline}  (a lease past its expiry, or gone, is
-- reclaimed: its holder must stop treating the slot as its own). next_deadline = earliest new expiry.
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local ttl = tonumber(ARGV[2])
local live, gone = {}, {}
local exp = now + ttl
for i = 3, NA do
  local m = ARGV[i]
  local e = tonumber(redis.call('ZSCORE', KEYS[1], m))
  if e ~= nil and e > now then
    redis.call('ZADD', KEYS[1], exp, m)
    live[#live + 1] = m
  else
    if e ~= nil then
      redis.call('ZREM', KEYS[1], m)
      conc_reclaimed(KEYS[2], 1)
    end
    gone[#gone + 1] = m
  end
end
if #live > 0 then conc_touch(KEYS[1], ttl * 2) end
local out = {}
for _, m in ipairs(live) do out[#out + 1] = m end
out[#out + 1] = '|'
for _, m in ipairs(gone) do out[#out + 1] = m end
out[#out + 1] = exp
return out
