-- op settle: charge the actual cost of a reservation, refunding or adding the difference to the estimate.
-- For each budget: if the reservation's window is still the current one, charged += actual - estimate
-- (a refund never takes the window below 0); if that window has ended, a refund is moot and only an
-- excess (actual > estimate) is charged, to the current window. A reservation settles once; settling an
-- unknown or expired reservation charges `actual` as a plain debit (so no usage is ever forgotten).
-- KEYS  [1] reservation  [2 .. 1+nb] budgets
-- ARGV  [1] now (0 = TIME)  [2] actual  [3] nb  [4 ..] budget, window ms (pairs)
-- Reply {allowed, limit, remaining, reset_at, 0, 0, '', charged_delta, refunded}
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local actual, nb = tonumber(ARGV[2]), tonumber(ARGV[3])
local B = budgets_load(KEYS, 2, ARGV, 4, nb, now)
local rec = redis.call('HGETALL', KEYS[1])
local R = {}
for i = 1, #rec, 2 do R[rec[i]] = tonumber(rec[i + 1]) end
local est = R['tokens']
local charged, refunded = 0, 0
for i = 1, nb do
  local b = B[i]
  local delta
  if est == nil then
    delta = actual
  elseif R['w' .. i] == b.start then
    delta = actual - est
  else
    delta = math.max(0, actual - est)
  end
  local before = b.c
  b.c = b.c + delta
  if b.c < 0 then b.c = 0 end
  if b.c ~= before then budget_write(b.key, now, b.start, b.window, b.c) end
  if i == 1 then
    if delta >= 0 then charged = delta else refunded = before - b.c end
  end
end
if est ~= nil then redis.call('DEL', KEYS[1]) end
local _, tight = budgets_decide(B, now, 0, true)
local d = budget_decision(tight, true, 0)
d[8] = charged
d[9] = refunded
return d
