-- op debit: post-hoc cost against the token budgets (ThrottleKit's crossing semantics): admitted iff budget
-- remains before it; the crossing debit counts in full (remaining floors at 0); a denied debit charges
-- nothing and says when the window ends.
-- KEYS  [1 .. nb] budgets
-- ARGV  [1] now (0 = TIME)  [2] tokens  [3] nb  [4 ..] budget, window ms (pairs)
-- Reply {allowed, limit, remaining, reset_at, retry_after, 0, ''} (the tightest budget)
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local tokens, nb = tonumber(ARGV[2]), tonumber(ARGV[3])
local B = budgets_load(KEYS, 1, ARGV, 4, nb, now)
local ok, pick, retry = budgets_decide(B, now, tokens, false)
if not ok then return budget_decision(pick, false, retry) end
budgets_charge(B, now, tokens)
return budget_decision(pick, true, 0)
