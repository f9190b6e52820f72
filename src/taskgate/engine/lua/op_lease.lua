-- op lease (the Fleet door's Reserve): grant up to `wants` units of the current window's budget, taken from
-- the very counter `check` spends, so leases and checks together never exceed the window's limit. Only the
-- fixedWindow fragment defines rate_lease and fw_count (the planner refuses other strategies).
-- KEYS  [1] rate key  [2] the window's tenants (hash; only for a split between tenants)
-- ARGV  [1] now (epoch-ms; 0 = Redis TIME)  [2] wants (>= 1)  [3..] strategy params (see the rate fragment)
--       then, with KEYS[2]: the tenant, its weight (> 0)
-- Reply {granted (0 = refused), window_end (epoch-ms), limit, retry_after_ms (0 unless refused), now}
--
-- Split between tenants (weighted max-min, work-conserving): the tenants active in the last window_ms (a
-- Reserve within it) share what the window has for leases, C = limit - what checks spent in it, by weight:
-- tenant j is entitled to C * w_j / (sum of the active weights). A grant never takes what another active
-- tenant is still entitled to and has not taken, so every tenant gets its share whenever it asks in time,
-- and what nobody active claims (a tenant alone, or idle) goes to whoever asks: the grant is at most
-- free - sum over the other active tenants of max(0, entitlement - granted). When the window has less left
-- than the active tenants are owed (a tenant took more before the others arrived), what is left is shared
-- in proportion to what each is owed. Never more than `free` in all.
-- Tenants hash: s = window start of the g fields; per tenant t: w:t weight, t:t last Reserve (epoch-ms),
-- g:t units granted in window s. A tenant idle for a window is forgotten.
local now = tg_now(ARGV[1])
local wants = tonumber(ARGV[2])
local P, j = rate_params(ARGV, 3)
if #KEYS < 2 then return rate_lease(KEYS[1], now, wants, P) end

local tk, me, my_w = KEYS[2], ARGV[j], tonumber(ARGV[j + 1])
local start, c = fw_count(KEYS[1], now, P)
local wend = start + P.window
local h = redis.call('HGETALL', tk)
local seen, wt, got, s = {}, {}, {}, nil
for i = 1, #h, 2 do
  local f, v = h[i], h[i + 1]
  local kind, t = string.sub(f, 1, 2), string.sub(f, 3)
  if kind == 't:' then seen[t] = tonumber(v)
  elseif kind == 'w:' then wt[t] = tonumber(v)
  elseif kind == 'g:' then got[t] = tonumber(v)
  elseif f == 's' then s = tonumber(v) end
end
local drop = {}
if s ~= start then  -- a new window: nothing granted in it yet
  for t in pairs(got) do drop[#drop + 1] = 'g:' .. t end
  got = {}
end
seen[me], wt[me] = now, my_w
local leased, W = 0, 0
for t, g in pairs(got) do leased = leased + g end
for t, at in pairs(seen) do
  if now - at < P.window then
    W = W + (wt[t] or 1)
  else  -- idle for a window: forgotten (its grants stay counted in the window's counter)
    drop[#drop + 1] = 't:' .. t
    drop[#drop + 1] = 'w:' .. t
  end
end
local cap = P.limit - math.max(0, c - leased)  -- what the window has for leases: the limit less checks
local held = 0  -- what the other active tenants are still entitled to
for t, at in pairs(seen) do
  if t ~= me and now - at < P.window then
    local owed = cap * (wt[t] or 1) / W - (got[t] or 0)
    if owed > 0 then held = held + owed end
  end
end
local free = P.limit - c
if free < 0 then free = 0 end
local owed = cap * my_w / W - (got[me] or 0)
local grant = math.floor(free - held)
if owed > 0 and free < held + owed then grant = math.ceil(free * owed / (held + owed)) end
local granted = math.min(wants, free, grant)
if granted < 1 then granted = 0 end
if #drop > 0 then redis.call('HDEL', tk, unpack(drop)) end
redis.call('HSET', tk, 's', start, 't:' .. me, now, 'w:' .. me, ARGV[j + 1], 'g:' .. me, (got[me] or 0) + granted)
tg_pexpire(tk, 2 * P.window)
if granted < 1 then return { 0, wend, P.limit, math.max(1, wend - now), now } end
redis.call('HSET', KEYS[1], 's', start, 'c', c + granted)
tg_pexpire(KEYS[1], wend - now)
return { granted, wend, P.limit, 0, now }
