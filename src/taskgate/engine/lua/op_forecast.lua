-- op forecast: what a key could spend now, when it next gains capacity, when it is full. Writes nothing.
-- KEYS  [1] rate key
-- ARGV  [1] now (0 = Redis TIME)  [2..] strategy params (see the rate fragment)
-- Reply {spendable_now, next_replenish_at, full_at}
local now = tg_now(ARGV[1])
local P = rate_params(ARGV, 2)
return rate_forecast(KEYS[1], now, P)
