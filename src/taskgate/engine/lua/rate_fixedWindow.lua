-- Rate fragment: fixed window (ThrottleKit-compatible state and arithmetic).
-- State at the rate key: hash s (window start, epoch-aligned: floor(now / window) * window, ThrottleKit's
-- expression), c (count); PEXPIRE to the window end.
-- Params P: limit, window_ms, arithmetic flag (unused: integers only), booking_horizon_ms (unused).
-- Decision.limit = limit;
-- reset_at = window end; a denial's retry_after = time to the window end.
local function rate_params(argv, i)
  return { limit = tonumber(argv[i]), window = tonumber(argv[i + 1]), tolerant = tg_tolerant(argv[i + 2]),
           horizon = tonumber(argv[i + 3]) }, i + 4
end

local function fw_count(key, now, P)
  local start = math.floor(now / P.window) * P.window
  local st = redis.call('HMGET', key, 's', 'c')
  local c = 0
  if tonumber(st[1]) == start then c = tonumber(st[2]) or 0 end
  return start, c
end

local function rate_decide(key, now, cost, P, consume, book)
  local start, c = fw_count(key, now, P)
  local wend = start + P.window
  if c + cost <= P.limit then
    if not consume then return { 1, P.limit, P.limit - c, wend, 0, 0 } end
    c = c + cost
    redis.call('HSET', key, 's', start, 'c', c)
    tg_pexpire(key, wend - now)
    return { 1, P.limit, P.limit - c, wend, 0, 0 }
  end
  local rem = P.limit - c
  if rem < 0 then rem = 0 end
  return { 0, P.limit, rem, wend, math.max(1, wend - now), 0 }
end

local function rate_forecast(key, now, P)
  local start, c = fw_count(key, now, P)
  local wend = start + P.window
  local next_at, full_at = now, now
  if c > 0 then next_at, full_at = wend, wend end
  return { math.max(0, P.limit - c), next_at, full_at }
end

-- rate_lease(key, now, wants, P) -> {granted, window_end, limit, retry_after, now} (op_lease.lua): the free
-- units of the current window, up to `wants`, are counted as spent at once (a partial grant is a grant).
local function rate_lease(key, now, wants, P)
  local start, c = fw_count(key, now, P)
  local wend = start + P.window
  local free = P.limit - c
  if free < 0 then free = 0 end
  local granted = math.min(wants, free)
  if granted < 1 then return { 0, wend, P.limit, math.max(1, wend - now), now } end
  redis.call('HSET', key, 's', start, 'c', c + granted)
  tg_pexpire(key, wend - now)
  return { granted, wend, P.limit, 0, now }
end

local function rate_max_cost(P) return P.limit end
