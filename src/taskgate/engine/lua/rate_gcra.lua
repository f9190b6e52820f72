-- Rate fragment: GCRA (ThrottleKit-compatible state and arithmetic).
-- State at the rate key: string, the theoretical arrival time (TAT, float, '%.17g'); PX = TAT - now.
-- Params P (from ARGV): period_ms, limit, burst, arithmetic flag (see common.lua), booking_horizon_ms.
-- T = period/limit (emission interval), tau = T * burst (tolerance). Decision.limit = burst.
-- The decision is ThrottleKit's gcra.check.lua expression for expression (inc = T * cost, allow_at =
-- tat + inc - tau, floor/ceil of plain doubles), so the two agree bit for bit.
-- rate_decide(key, now, cost, P, consume, book) -> {allowed, limit, remaining, reset_at, retry_after, booked}
--   consume=false: peek (nothing written). book=true: a denial within the booking horizon takes the slot
--   now (TAT advances) and replies booked=1 with retry_after = when the slot becomes valid.
local function rate_params(argv, i)
  return { period = tonumber(argv[i]), limit = tonumber(argv[i + 1]), burst = tonumber(argv[i + 2]),
           tolerant = tg_tolerant(argv[i + 3]), horizon = tonumber(argv[i + 4]) }, i + 5
end

local function gcra_tat(key, now)
  local tat = tonumber(redis.call('GET', key))
  if tat == nil or tat < now then tat = now end
  return tat
end

-- whole units left at `now` when the TAT is `t` (ThrottleKit: floor((tau - (tat - now)) / T), at least 0)
local function gcra_left(P, tau, t, now, T)
  local r = math.floor((tau - (t - now)) / T + tg_slack(P, t) / T)
  if r < 0 then r = 0 end
  return r
end

local function gcra_set(key, new_tat, now)
  redis.call('SET', key, string.format('%.17g', new_tat), 'PX', math.max(TG_MIN_TTL, math.ceil(new_tat - now)))
end

local function rate_decide(key, now, cost, P, consume, book)
  local T = P.period / P.limit
  local tau = T * P.burst
  local inc = T * cost
  local tat = gcra_tat(key, now)
  local new_tat = tat + inc
  local allow_at = new_tat - tau
  if now + tg_slack(P, allow_at) < allow_at then
    local retry = tg_ceil(P, allow_at - now)
    if retry < 1 then retry = 1 end
    if consume and book and P.horizon > 0 and retry <= P.horizon then
      gcra_set(key, new_tat, now)
      return { 0, P.burst, 0, tg_ceil(P, new_tat), retry, 1 }
    end
    return { 0, P.burst, gcra_left(P, tau, tat, now, T), tg_ceil(P, tat), retry, 0 }
  end
  if not consume then  -- peek: report the state as it stands
    return { 1, P.burst, gcra_left(P, tau, tat, now, T), tg_ceil(P, tat), 0, 0 }
  end
  gcra_set(key, new_tat, now)
  return { 1, P.burst, gcra_left(P, tau, new_tat, now, T), tg_ceil(P, new_tat), 0, 0 }
end

-- rate_forecast(key, now, P) -> {spendable_now, next_replenish_at, full_at}
local function rate_forecast(key, now, P)
  local T = P.period / P.limit
  local tau = T * P.burst
  local tat = gcra_tat(key, now)
  local s = gcra_left(P, tau, tat, now, T)
  if s > P.burst then s = P.burst end
  local next_at = now
  if s < P.burst then next_at = tg_ceil(P, tat - tau + (s + 1) * T) end
  return { s, next_at, tg_ceil(P, tat) }
end

local function rate_max_cost(P) return P.burst end
