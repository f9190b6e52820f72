-- Rate fragment: token bucket (ThrottleKit-compatible state and arithmetic).
-- State at the rate key: hash t (tokens, float '%.17g'), l (last update, epoch-ms); PEXPIRE = time to fill
-- from empty. Params P: capacity, refill_per_sec, arithmetic flag (see common.lua), booking_horizon_ms
-- (unused: no booking on a token bucket).
-- Refill is continuous: tokens = t + elapsed * (refill / 1000), capped at capacity. Decision.limit = capacity.
-- The decision is ThrottleKit's tokenBucket.check.lua expression for expression (refill_per_ms =
-- refill_per_sec / 1000, times divided by refill_per_ms), so the two agree bit for bit.
local function rate_params(argv, i)
  return { capacity = tonumber(argv[i]), rps = tonumber(argv[i + 1]), tolerant = tg_tolerant(argv[i + 2]),
           horizon = tonumber(argv[i + 3]) }, i + 4
end

local function tb_tokens(key, now, P, per_ms)
  local st = redis.call('HMGET', key, 't', 'l')
  local t, l = tonumber(st[1]), tonumber(st[2])
  if t == nil then t = P.capacity end
  if l == nil then l = now end
  local elapsed = now - l
  if elapsed < 0 then elapsed = 0 end
  t = t + elapsed * per_ms
  if t > P.capacity then t = P.capacity end
  return t
end

local function tb_whole(P, t)
  local r = math.floor(t + tg_slack(P, t))
  if r < 0 then r = 0 end
  return r
end

local function rate_decide(key, now, cost, P, consume, book)
  local per_ms = P.rps / 1000
  local t = tb_tokens(key, now, P, per_ms)
  if t + tg_slack(P, t) >= cost then
    if not consume then
      return { 1, P.capacity, tb_whole(P, t), now + tg_ceil(P, (P.capacity - t) / per_ms), 0, 0 }
    end
    local new_t = t - cost
    if new_t < 0 then new_t = 0 end  -- (tolerant arithmetic only: t may fall short of cost by the slack)
    redis.call('HSET', key, 't', string.format('%.17g', new_t), 'l', string.format('%.17g', now))
    tg_pexpire(key, P.capacity / per_ms)
    return { 1, P.capacity, tb_whole(P, new_t), now + tg_ceil(P, (P.capacity - new_t) / per_ms), 0, 0 }
  end
  local retry = tg_ceil(P, (cost - t) / per_ms)
  if retry < 1 then retry = 1 end
  return { 0, P.capacity, tb_whole(P, t), now + tg_ceil(P, (P.capacity - t) / per_ms), retry, 0 }
end

local function rate_forecast(key, now, P)
  local per_ms = P.rps / 1000
  local t = tb_tokens(key, now, P, per_ms)
  local s = tb_whole(P, t)
  local next_at = now
  if s < P.capacity then next_at = now + tg_ceil(P, (s + 1 - t) / per_ms) end
  return { s, next_at, now + tg_ceil(P, (P.capacity - t) / per_ms) }
end

local function rate_max_cost(P) return P.capacity end
