-- Rate fragment for policies without a rate axis: always admits, writes nothing.
local function rate_params(argv, i) return { horizon = 0 }, i end
local function rate_decide(key, now, cost, P, consume, book) return { 1, 0, 0, now, 0, 0 } end
local function rate_forecast(key, now, P) return { 0, now, now } end
local function rate_max_cost(P) return 0 end
