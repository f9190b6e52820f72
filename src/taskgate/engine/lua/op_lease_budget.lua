-- op lease_budget (the Fleet door's Reserve on AXIS_TOKEN_BUDGET): grant up to `wants` tokens of the policy's
-- token budgets at once, charged to every budget like a debit, so leases, debits and reservations together
-- never exceed any budget's window. The grant is the least any budget has left; a lease is void at the
-- earliest end among the budgets' windows.
-- KEYS  [1 .. nb] budgets
-- ARGV  [1] now (0 = TIME)  [2] wants (>= 1)  [3] nb  [4 ..] budget, window ms (pairs)
-- Reply {granted (0 = refused), expiry (epoch-ms), limit (that budget), retry_after_ms (0 unless refused), now}
--   refused: expiry and limit of the budget that binds longest, retry_after = until its window ends
local now = tg_now(ARGV[1])
local wants, nb = tonumber(ARGV[2]), tonumber(ARGV[3])
local B = budgets_load(KEYS, 1, ARGV, 4, nb, now)
local grant, first = wants, nil
for i = 1, #B do
  local free = B[i].budget - B[i].c
  if free < grant then grant = free end
  if first == nil or B[i].start + B[i].window < first.start + first.window then first = B[i] end
end
if grant < 1 then
  local ok, pick, retry = budgets_decide(B, now, 1, true)
  return { 0, pick.start + pick.window, pick.budget, math.max(1, retry), now }
end
budgets_charge(B, now, grant)
return { grant, first.start + first.window, first.budget, 0, now }
