-- Rate fragment: sliding window, weighted buckets (ThrottleKit-compatible state and arithmetic).
-- State at the rate key: hash ring of buckets+1 slots, field (idx % slots) -> "idx:count"; PEXPIRE window + w.
-- Params P: window_ms, limit, buckets, arithmetic flag (see common.lua), booking_horizon_ms (unused).
-- w = window / buckets.
-- Estimate = the `buckets` most recent buckets (current one included) in full + the oldest bucket weighted by
-- the fraction of it still inside the window. reset_at = end of the current bucket + window.
-- A denial's retry_after is exact when the oldest bucket's decay frees enough within the current bucket,
-- otherwise the time to the next bucket boundary (when the estimate next drops by a whole bucket).
-- The decision is ThrottleKit's slidingWindow.check.lua expression for expression (weight = (w - elapsed)
-- / w, retry = ceil(D * w / oldest)), so the two agree bit for bit.
local function rate_params(argv, i)
  return { window = tonumber(argv[i]), limit = tonumber(argv[i + 1]), buckets = tonumber(argv[i + 2]),
           tolerant = tg_tolerant(argv[i + 3]), horizon = tonumber(argv[i + 4]) }, i + 5
end

local function sw_read(key, now, P)
  local w = P.window / P.buckets
  local slots = P.buckets + 1
  local idx = math.floor(now / w)
  local elapsed = now - idx * w
  if elapsed < 0 then elapsed = 0 end
  local weight = (w - elapsed) / w
  if weight < 0 then weight = 0 end
  if weight > 1 then weight = 1 end
  local raw = redis.call('HGETALL', key)
  local counts = {}
  for j = 1, #raw, 2 do
    local v = raw[j + 1]
    local sep = string.find(v, ':', 1, true)
    if sep then counts[tonumber(string.sub(v, 1, sep - 1))] = tonumber(string.sub(v, sep + 1)) end
  end
  local full = 0
  for b = idx - P.buckets + 1, idx do full = full + (counts[b] or 0) end
  local oldest = counts[idx - P.buckets] or 0
  return w, slots, idx, counts, full, oldest, weight
end

local function sw_left(P, x)
  local r = math.floor(x + tg_slack(P, x))
  if r < 0 then r = 0 end
  return r
end

local function rate_decide(key, now, cost, P, consume, book)
  local w, slots, idx, counts, full, oldest, weight = sw_read(key, now, P)
  local est = full + oldest * weight
  local projected = est + cost
  local reset_at = tg_ceil(P, (idx + 1) * w + P.window)
  if projected <= P.limit + tg_slack(P, P.limit) then
    if not consume then return { 1, P.limit, sw_left(P, P.limit - est), reset_at, 0, 0 } end
    local c = (counts[idx] or 0) + cost
    redis.call('HSET', key, idx % slots, idx .. ':' .. c)
    tg_pexpire(key, P.window + w)
    return { 1, P.limit, sw_left(P, P.limit - projected), reset_at, 0, 0 }
  end
  local D = projected - P.limit
  local retry
  if oldest > 0 and D <= oldest * weight then
    retry = tg_ceil(P, D * w / oldest)
  else
    retry = tg_ceil(P, (idx + 1) * w - now)
  end
  if retry < 1 then retry = 1 end
  return { 0, P.limit, sw_left(P, P.limit - est), reset_at, retry, 0 }
end

local function rate_forecast(key, now, P)
  local w, slots, idx, counts, full, oldest, weight = sw_read(key, now, P)
  local est = full + oldest * weight
  local s = sw_left(P, P.limit - est)
  local next_at = now
  if est > 0 then next_at = tg_ceil(P, (idx + 1) * w) end
  local last = nil
  for b = idx - P.buckets, idx do if (counts[b] or 0) > 0 then last = b end end
  local full_at = now
  if last ~= nil then full_at = tg_ceil(P, (last + 1) * w + P.window) end
  return { s, next_at, full_at }
end

local function rate_max_cost(P) return P.limit end
