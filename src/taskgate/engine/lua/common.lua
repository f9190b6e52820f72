-- taskgate engine: shared helpers, prepended to every composed script.
-- Units: times are epoch milliseconds, durations milliseconds. Every reply value is an integer.
local function tg_now(argv_now)
  local n = tonumber(argv_now)
  if n == nil or n <= 0 then
    local t = redis.call('TIME')
    n = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return n
end

-- Float tolerance: a double carries ~16 digits, so epoch-ms values (~1.7e12) are only exact to ~2.4e-4 ms.
-- tg_tol(x) is a few ulps of x (and at least 1e-9): comparisons and roundings forgive that much, no more.
local function tg_tol(x)
  local a = math.abs(x)
  if a < 1 then a = 1 end
  return a * 8e-16 + 1e-9
end

local function tg_ceil(x) return math.ceil(x - tg_tol(x)) end

-- Expiries only clean up: every state carries its own time (window start, TAT, bucket index), so a key
-- that outlives its window a little changes no decision. The floor of 1 s keeps a key from expiring
-- between two calls of the same window when `now` is given explicitly (tests) or clocks differ slightly.
local TG_MIN_TTL = 1000

local function tg_pexpire(key, ms)
  ms = math.ceil(ms)
  if ms < TG_MIN_TTL then ms = TG_MIN_TTL end
  redis.call('PEXPIRE', key, ms)
end
