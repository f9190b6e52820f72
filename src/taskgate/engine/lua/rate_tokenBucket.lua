-- Rate fragment: token bucket (ThrottleKit-compatible state).
-- State at the rate key: hash t (tokens, float), l (last update, epoch-ms); PEXPIRE = time to fill from empty.
-- Params P: capacity, refill_per_sec, booking_horizon_ms (unused: no booking on a token bucket).
-- Refill is continuous: tokens = t + elapsed * refill / 1000, capped at capacity. Decision.limit = capacity.
local function rate_params(argv, i)
  return { capacity = tonumber(argv[i]), rps = tonumber(argv[i + 1]), horizon = tonumber(argv[i + 2]) }, i + 3
end

local function tb_tokens(key, now, P)
  local st = redis.call('HMGET', key, 't', 'l')
  local t, l = tonumber(st[1]), tonumber(st[2])
  if t == nil or l == nil then return P.capacity end
  if now > l then t = t + (now - l) * P.rps / 1000 end
  if t > P.capacity then t = P.capacity end
  return t
end

local function tb_fill_ms(P, t) return tg_ceil((P.capacity - t) * 1000 / P.rps) end

local function rate_decide(key, now, cost, P, consume, book)
  local t = tb_tokens(key, now, P)
  if t + 1e-9 >= cost then
    if not consume then
      return { 1, P.capacity, math.floor(t + 1e-9), now + tb_fill_ms(P, t), 0, 0 }
    end
    t = math.max(0, t - cost)
    redis.call('HSET', key, 't', string.format('%.17g', t), 'l', now)
    tg_pexpire(key, P.capacity * 1000 / P.rps)
    return { 1, P.capacity, math.floor(t + 1e-9), now + tb_fill_ms(P, t), 0, 0 }
  end
  local retry = tg_ceil((cost - t) * 1000 / P.rps)
  if retry < 1 then retry = 1 end
  return { 0, P.capacity, math.floor(t + 1e-9), now + tb_fill_ms(P, t), retry, 0 }
end

local function rate_forecast(key, now, P)
  local t = tb_tokens(key, now, P)
  local s = math.floor(t + 1e-9)
  local next_at = now
  if s < P.capacity then next_at = now + tg_ceil((s + 1 - t) * 1000 / P.rps) end
  return { s, next_at, now + tb_fill_ms(P, t) }
end

local function rate_max_cost(P) return P.capacity end
