-- op release: give back one lease. Idempotent; a lease that was already reclaimed (expired and reaped, or
-- released) frees nothing, so a late release can never free another holder's slot.
-- KEYS  [1] leases  [2] lease meta
-- ARGV  [1] now (0 = TIME)  [2] lease member "<holder>:<acquired_ms>"  [3] dropped 1|0  [4] min  [5] max
-- Reply 1 if the lease was held and is now released, 0 if it was not held (already released or reclaimed).
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local member, dropped = ARGV[2], ARGV[3] == '1'
local minl, maxl = tonumber(ARGV[4]), tonumber(ARGV[5])
local exp = tonumber(redis.call('ZSCORE', KEYS[1], member))
if exp == nil then return 0 end
redis.call('ZREM', KEYS[1], member)
if exp <= now then
  -- expired before this release arrived: reclaimed, not released
  conc_reclaimed(KEYS[2], 1)
  return 0
end
local acquired = tonumber(string.match(member, ':(%d+)$'))
if acquired ~= nil and now >= acquired then
  local held = now - acquired
  local hold = tonumber(redis.call('HGET', KEYS[2], 'hold'))
  if hold == nil then hold = held else hold = hold * 0.8 + held * 0.2 end
  redis.call('HSET', KEYS[2], 'hold', string.format('%.17g', hold))
end
if minl < maxl then conc_adapt(KEYS[2], minl, maxl, dropped) end
tg_pexpire(KEYS[2], 7 * 86400000)
return 1
