-- op reserve: escrow an estimate against the token budgets. Admitted iff charged + tokens <= budget in every
-- budget (so reservations alone never overshoot); the estimate is charged now and recorded in the
-- reservation hash (tokens, at, window start per budget) so settle can refund or charge the difference.
-- KEYS  [1] reservation  [2 .. 1+nb] budgets
-- ARGV  [1] now (0 = TIME)  [2] tokens  [3] reservation ttl ms  [4] nb  [5 ..] budget, window ms (pairs)
-- Reply {allowed, limit, remaining, reset_at, retry_after, 0, '', expires_at}
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local tokens, res_ttl, nb = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local B = budgets_load(KEYS, 2, ARGV, 5, nb, now)
local ok, pick, retry = budgets_decide(B, now, tokens, true)
if not ok then
  local d = budget_decision(pick, false, retry)
  d[8] = 0
  return d
end
budgets_charge(B, now, tokens)
local rec = { 'tokens', tokens, 'at', now }
for i = 1, nb do rec[#rec + 1] = 'w' .. i; rec[#rec + 1] = B[i].start end
redis.call('HSET', KEYS[1], unpack(rec))
tg_pexpire(KEYS[1], res_ttl)
local _, tight = budgets_decide(B, now, 0, true)
local d = budget_decision(tight, true, 0)
d[8] = now + res_ttl
return d
