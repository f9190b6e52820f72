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

-- Arithmetic. By default plain doubles: the rate fragments compute every decision with ThrottleKit's own
-- expressions, in its order and with its roundings (its Lua, as shipped by throttlekit-py), so a decision is
-- bit-identical to ThrottleKit's (tests/test_differential.py), float artefacts included. A policy with
-- `arithmetic: tolerant` (P.tolerant) forgives a few ulps instead: tg_slack(P, x) is then a few ulps of x
-- (at least 1e-9), otherwise exactly 0, and x + 0, x - 0, x + 0 / T are x bit for bit, so the default path
-- is ThrottleKit's expression unchanged.
local function tg_slack(P, x)
  if not P.tolerant then return 0 end
  local a = math.abs(x)
  if a < 1 then a = 1 end
  return a * 8e-16 + 1e-9
end

local function tg_ceil(P, x) return math.ceil(x - tg_slack(P, x)) end

-- the arithmetic flag ARGV (after a strategy's parameters): 1 = tolerant
local function tg_tolerant(v) return tonumber(v) == 1 end

-- Expiries only clean up: every state carries its own time (window start, TAT, bucket index), so a key
-- that outlives its window a little changes no decision. The floor of 1 s keeps a key from expiring
-- between two calls of the same window when `now` is given explicitly (tests) or clocks differ slightly.
local TG_MIN_TTL = 1000

local function tg_pexpire(key, ms)
  ms = math.ceil(ms)
  if ms < TG_MIN_TTL then ms = TG_MIN_TTL end
  redis.call('PEXPIRE', key, ms)
end
