-- Rate fragment: sliding window log (ThrottleKit-compatible state), O(log n) per unit.
-- State at the rate key: sorted set, one member per admitted unit ("now-n", score now); PEXPIRE window.
-- Params P: window_ms, limit, arithmetic flag (unused: integers only), booking_horizon_ms (unused).
-- Entries with score <= now - window are trimmed.
-- reset_at = oldest entry in the window + window (ThrottleKit's vectors); a denial's retry_after = when
-- enough of the oldest entries leave the window for `cost` units.
local function rate_params(argv, i)
  return { window = tonumber(argv[i]), limit = tonumber(argv[i + 1]), tolerant = tg_tolerant(argv[i + 2]),
           horizon = tonumber(argv[i + 3]) }, i + 4
end

local function swl_oldest(key, now, P)
  local o = redis.call('ZRANGEBYSCORE', key, '(' .. (now - P.window), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if o[2] then return tonumber(o[2]) + P.window end
  return now + P.window
end

local function rate_decide(key, now, cost, P, consume, book)
  if consume then redis.call('ZREMRANGEBYSCORE', key, '-inf', now - P.window) end
  local n
  if consume then
    n = redis.call('ZCARD', key)
  else
    n = redis.call('ZCOUNT', key, '(' .. (now - P.window), '+inf')
  end
  if n + cost <= P.limit then
    if not consume then return { 1, P.limit, P.limit - n, swl_oldest(key, now, P), 0, 0 } end
    for i = 1, cost do redis.call('ZADD', key, now, now .. '-' .. (n + i)) end
    tg_pexpire(key, P.window)
    return { 1, P.limit, P.limit - n - cost, swl_oldest(key, now, P), 0, 0 }
  end
  -- the (n + cost - limit)-th oldest entry in the window must leave it
  local need = n + cost - P.limit
  local e = redis.call('ZRANGEBYSCORE', key, '(' .. (now - P.window), '+inf', 'WITHSCORES', 'LIMIT', need - 1, 1)
  local retry = 1
  if e[2] then retry = math.max(1, tonumber(e[2]) + P.window - now) end
  return { 0, P.limit, math.max(0, P.limit - n), swl_oldest(key, now, P), retry, 0 }
end

local function rate_forecast(key, now, P)
  local n = redis.call('ZCOUNT', key, '(' .. (now - P.window), '+inf')
  local next_at, full_at = now, now
  if n > 0 then
    local o = redis.call('ZRANGEBYSCORE', key, '(' .. (now - P.window), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    next_at = tonumber(o[2]) + P.window
    local l = redis.call('ZREVRANGEBYSCORE', key, '+inf', '(' .. (now - P.window), 'WITHSCORES', 'LIMIT', 0, 1)
    full_at = tonumber(l[2]) + P.window
  end
  return { math.max(0, P.limit - n), next_at, full_at }
end

local function rate_max_cost(P) return P.limit end
