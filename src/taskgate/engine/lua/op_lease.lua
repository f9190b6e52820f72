-- op lease (the Fleet door's Reserve): grant up to `wants` units of the current window's budget, taken from
-- the very counter `check` spends, so leases and checks together never exceed the window's limit. Only the
-- fixedWindow fragment defines rate_lease (the planner refuses other strategies).
-- KEYS  [1] rate key
-- ARGV  [1] now (epoch-ms; 0 = Redis TIME)  [2] wants (>= 1)  [3..] strategy params (see the rate fragment)
-- Reply {granted (0 = refused), window_end (epoch-ms), limit, retry_after_ms (0 unless refused), now}
local now = tg_now(ARGV[1])
local wants = tonumber(ARGV[2])
local P = rate_params(ARGV, 3)
return rate_lease(KEYS[1], now, wants, P)
