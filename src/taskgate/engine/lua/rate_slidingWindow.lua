-- Rate fragment: sliding window, weighted buckets (ThrottleKit-compatible state).
-- State at the rate key: hash ring of buckets+1 slots, field (idx % slots) -> "idx:count"; PEXPIRE window + w.
-- Params P: window_ms, limit, buckets, booking_horizon_ms (unused). w = window / buckets.
-- Estimate = the `buckets` most recent buckets (current one included) in full + the oldest bucket weighted by
-- the fraction of it still inside the window. reset_at = end of the current bucket + window.
-- A denial's retry_after is exact when the oldest bucket's decay frees enough within the current bucket,
-- otherwise the time to the next bucket boundary (when the estimate next drops by a whole bucket).
local function rate_params(argv, i)
  return { window = tonumber(argv[i]), limit = tonumber(argv[i + 1]), buckets = tonumber(argv[i + 2]),
           horizon = tonumber(argv[i + 3]) }, i + 4
end

local function sw_read(key, now, P)
  local w = P.window / P.buckets
  local slots = P.buckets + 1
  local idx = math.floor(now / w)
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
  local frac = (now - idx * w) / w
  return w, slots, idx, counts, full, oldest, frac
end

local function rate_decide(key, now, cost, P, consume, book)
  local w, slots, idx, counts, full, oldest, frac = sw_read(key, now, P)
  local est = full + oldest * (1 - frac)
  local reset_at = tg_ceil((idx + 1) * w + P.window)
  if est + cost <= P.limit + 1e-9 then
    if not consume then return { 1, P.limit, math.max(0, math.floor(P.limit - est + 1e-9)), reset_at, 0, 0 } end
    local c = (counts[idx] or 0) + cost
    redis.call('HSET', key, tostring(idx % slots), idx .. ':' .. c)
    tg_pexpire(key, P.window + w)
    return { 1, P.limit, math.max(0, math.floor(P.limit - est - cost + 1e-9)), reset_at, 0, 0 }
  end
  local retry
  local room = P.limit - cost - full
  if oldest > 0 and room >= 0 then
    local f = 1 - room / oldest
    retry = tg_ceil(idx * w + f * w - now)
  else
    retry = tg_ceil((idx + 1) * w - now)
  end
  if retry < 1 then retry = 1 end
  return { 0, P.limit, math.max(0, math.floor(P.limit - est + 1e-9)), reset_at, retry, 0 }
end

local function rate_forecast(key, now, P)
  local w, slots, idx, counts, full, oldest, frac = sw_read(key, now, P)
  local est = full + oldest * (1 - frac)
  local s = math.max(0, math.floor(P.limit - est + 1e-9))
  local next_at = now
  if est > 0 then next_at = tg_ceil((idx + 1) * w) end
  local last = nil
  for b = idx - P.buckets, idx do if (counts[b] or 0) > 0 then last = b end end
  local full_at = now
  if last ~= nil then full_at = tg_ceil((last + 1) * w + P.window) end
  return { s, next_at, full_at }
end

local function rate_max_cost(P) return P.limit end
