-- op report: what the provider said about (policy, key), applied fleet-wide in one atomic call.
-- KEYS  [1] provider hash (provider.lua)  [2] lease meta (concurrency; any key of the slot when none)
--       [3 .. 2+nb] budgets
-- ARGV  [1] now (0 = TIME)  [2] hold ms (0: none)  [3] longest hold ms (the policy's provider.maxHold)
--       [4] rate limited (a 429) 1|0  [5] requests limit (-1 unknown)  [6] requests remaining (-1 unknown)
--       [7] requests window ms (-1 unknown)  [8] tokens remaining (-1 unknown)
--       [9] concurrency min  [10] concurrency max (0 0: no concurrency axis)  [11] return-slot horizon ms
--       [12] nb  [13 .. 12+2nb] budget, window ms (pairs)
-- Effects: the hold is extended to now + min(hold, longest) (never shortened); the pacing takes the reported
-- limit per window (iv = window / limit; burst = limit, or the most remaining reported + 1 when lower: see
-- provider.lua) and its remaining is lowered to the reported one
-- (never raised: calls in flight are not in the provider's count yet); a 429 with a known pacing and no
-- remaining counts as remaining 0; each budget's remaining in its current window is lowered to the reported
-- tokens remaining; a 429 shrinks an adaptive concurrency limit (x0.75, as a dropped release does); a raised
-- limit re-bases the return cursor (wq) to now, so callers denied from then on come back at the new pace
-- instead of after the slots handed out at the old one (those callers sleep on their return times: without
-- it the fleet kept the old rate for up to provider.horizon, the provider's bucket refilled meanwhile, and
-- the next callers to ask took that burst at once, over the new limit).
-- Reply {hold_until (0 none), now, concurrency limit (0 none), provider's limit (0 none), pacing interval us,
--        budgets lowered, 429s reported on this key, pacing burst (0 none), ms of hold this report added}
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local hold, longest, limited = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local rlimit, rrem, rwin, trem = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local minl, maxl, hz, nb = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local K = KEYS[1]
local h = redis.call('HMGET', K, 'u', 'iv', 'cap', 'tat', 'wq', 'wu')
local u = tonumber(h[1]) or 0
local ttl, added = 0, 0
if hold > 0 then
  if hold > longest then hold = longest end
  if now + hold > u then
    added = now + hold - math.max(u, now)
    u = now + hold
    redis.call('HSET', K, 'u', u)
  end
end
if u > now then ttl = u - now end
local iv, cap, tat = tonumber(h[2]), tonumber(h[3]), tonumber(h[4])
local rem = nil  -- the pacing's remaining now (nil: no pacing yet)
if iv ~= nil then
  local t = tat or now
  if t < now then t = now end
  rem = cap - (t - now) / iv
end
local plimit = tonumber(redis.call('HGET', K, 'lim')) or 0
-- denied callers hold return slots until then: the cursor (provider.lua: wq), or the slots handed out
-- before a raised limit re-based it (wu)
local slow = tonumber(h[6]) or 0
local waiting = math.max(tonumber(h[5]) or 0, slow)
local backlog = waiting > now
if rlimit > 0 and rwin > 0 then
  local niv = rwin / rlimit
  local mr = tonumber(redis.call('HGET', K, 'mr'))
  if mr == nil or iv == nil or math.abs(niv - iv) > pv_tol(iv) then mr = -1 end  -- a new limit: observe again
  if backlog and iv ~= nil and niv < iv - pv_tol(iv) then
    -- a raised limit: the next denied callers get return slots at the new pace from now, between those
    -- handed out at the old pace (the fleet reaches the new rate once callers ask, not after the old slots)
    redis.call('HSET', K, 'wq', string.format('%.17g', now), 'wu', string.format('%.17g', waiting))
    slow = waiting
  end
  if rrem > mr then mr = rrem end
  iv, cap, plimit = niv, rlimit, rlimit
  if mr >= 0 and mr + 1 < cap then cap = mr + 1 end
  -- Until the slots handed out at a lower limit are past, the pacing banks no burst (2: one call of slack
  -- for a caller late to its slot): those callers sleep until their slots, so the fleet runs under the new
  -- limit until others ask, and the provider's bucket refills meanwhile; the calls left unused are not
  -- handed out at once to the next ones to ask (callers beyond the horizon come back in bunches).
  if slow > now and cap > 2 then cap = 2 end
  redis.call('HSET', K, 'iv', string.format('%.17g', iv), 'cap', cap, 'mr', mr, 'lim', rlimit, 'hz', hz)
end
if iv ~= nil then
  -- the remaining is kept across a change of limit or burst, and lowered (never raised) to the reported one
  if rrem < 0 and limited then rrem = 0 end
  if rem == nil or rem > cap then rem = cap end
  if rrem >= 0 and rrem < rem then rem = rrem end
  redis.call('HSET', K, 'tat', string.format('%.17g', now + (cap - rem) * iv))
  -- the pacing outlives the last report by ten of its windows (a quiet key forgets it)
  local span = 10 * iv * plimit
  if span > ttl then ttl = span end
end
local n = 0
if limited then n = redis.call('HINCRBY', K, 'n', 1) else n = tonumber(redis.call('HGET', K, 'n')) or 0 end
if ttl > 0 or limited then conc_touch(K, math.max(ttl, 60000)) end
local lowered = 0
if trem >= 0 and nb > 0 then
  local B = budgets_load(KEYS, 3, ARGV, 13, nb, now)
  for i = 1, nb do
    local b = B[i]
    if b.budget - b.c > trem then
      budget_write(b.key, now, b.start, b.window, b.budget - trem)
      lowered = lowered + 1
    end
  end
end
local lim = 0
if maxl > 0 then
  lim = conc_limit(KEYS[2], minl, maxl)
  if limited and minl < maxl then lim = conc_adapt(KEYS[2], minl, maxl, true) end
  lim = math.floor(lim)
end
local ivus = 0
if iv ~= nil then ivus = math.floor(iv * 1000 + 0.5) end
if u <= now then u = 0 end
return { u, now, lim, plimit, ivus, lowered, n, cap or 0, added }
