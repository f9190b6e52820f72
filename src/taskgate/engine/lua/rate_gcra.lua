-- Rate fragment: GCRA (ThrottleKit-compatible state).
-- State at the rate key: string, the theoretical arrival time (TAT, float, '%.17g'); PX = TAT - now.
-- Params P (from ARGV): period_ms, limit, burst, booking_horizon_ms.
-- T = period/limit (emission interval), tau = T * burst (tolerance). Decision.limit = burst.
-- rate_decide(key, now, cost, P, consume, book) -> {allowed, limit, remaining, reset_at, retry_after, booked}
--   consume=false: peek (nothing written). book=true: a denial within the booking horizon takes the slot
--   now (TAT advances) and replies booked=1 with retry_after = when the slot becomes valid.
local function rate_params(argv, i)
  return { period = tonumber(argv[i]), limit = tonumber(argv[i + 1]), burst = tonumber(argv[i + 2]),
           horizon = tonumber(argv[i + 3]) }, i + 4
end

local function gcra_tat(key, now)
  local tat = tonumber(redis.call('GET', key))
  if tat == nil or tat < now then tat = now end
  return tat
end

local function rate_decide(key, now, cost, P, consume, book)
  local T = P.period / P.limit
  local tau = T * P.burst
  local tat = gcra_tat(key, now)
  local new_tat = tat + cost * T
  local allow_at = new_tat - tau
  if now + tg_tol(allow_at) >= allow_at then
    if consume then
      redis.call('SET', key, string.format('%.17g', new_tat), 'PX', math.max(TG_MIN_TTL, tg_ceil(new_tat - now)))
    end
    local remaining = math.floor((tau - (new_tat - now)) / T + tg_tol(new_tat) / T)
    if remaining < 0 then remaining = 0 end
    if not consume then
      -- peek: report the state as it stands
      remaining = math.floor((tau - (tat - now)) / T + tg_tol(tat) / T)
      return { 1, P.burst, remaining, tg_ceil(tat), 0, 0 }
    end
    return { 1, P.burst, remaining, tg_ceil(new_tat), 0, 0 }
  end
  local remaining = math.floor((tau - (tat - now)) / T + tg_tol(tat) / T)
  if remaining < 0 then remaining = 0 end
  local retry = tg_ceil(allow_at - now)
  if retry < 1 then retry = 1 end
  if consume and book and P.horizon > 0 and retry <= P.horizon then
    redis.call('SET', key, string.format('%.17g', new_tat), 'PX', math.max(TG_MIN_TTL, tg_ceil(new_tat - now)))
    return { 0, P.burst, 0, tg_ceil(new_tat), retry, 1 }
  end
  return { 0, P.burst, remaining, tg_ceil(tat), retry, 0 }
end

-- rate_forecast(key, now, P) -> {spendable_now, next_replenish_at, full_at}
local function rate_forecast(key, now, P)
  local T = P.period / P.limit
  local tau = T * P.burst
  local tat = gcra_tat(key, now)
  local s = math.floor((tau - (tat - now)) / T + tg_tol(tat) / T)
  if s < 0 then s = 0 end
  if s > P.burst then s = P.burst end
  local next_at = now
  if s < P.burst then next_at = tg_ceil(tat - tau + (s + 1) * T) end
  return { s, next_at, tg_ceil(tat) }
end

local function rate_max_cost(P) return P.burst end
