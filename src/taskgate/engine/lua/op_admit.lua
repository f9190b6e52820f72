-- op admit: rate x concurrency x cost in ONE atomic decision. Nothing is consumed unless every axis admits
-- (the one exception: with book=1 a rate denial within the booking horizon books the rate slot).
-- KEYS  [1] rate  [2] bookings  [3] leases  [4] lease meta  [5] waiters  [6] reservation
--       [7 .. 6+nb] budgets  [7+nb] provider key (provider.lua)
-- ARGV  [1] now (0 = TIME)  [2] cost (rate units)  [3] tokens (cost axis)  [4] holder ("" = no concurrency)
--       [5] lease ttl ms  [6] min limit  [7] max limit  [8] accounting e|d  [9] book 1|0
--       [10] booking token ("" none)  [11] booking grace ms  [12] reservation ttl ms  [13] nb
--       [14 .. 13+2nb] budget, window ms (pairs)  [14+2nb ..] rate params (see the rate fragment)
-- Reply {allowed, limit, remaining, reset_at, retry_after, booked, token, axis, lease, lease_expires_at,
--        reserved_tokens}  axis = "provider"|"rate"|"concurrency"|"cost" on a denial (a provider hold or
--        pacing is asked first; nothing else is touched then); on success the axis reported in the Decision
--        fields ("concurrency" if present, else "cost", else "rate").
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local cost, tokens, holder = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local ttl, minl, maxl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local escrow, book, token = ARGV[8] == 'e', ARGV[9] == '1', ARGV[10]
local grace, res_ttl, nb = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local P = rate_params(ARGV, 14 + 2 * nb)
local K_rate, K_bk, K_leases, K_meta, K_wait, K_res = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local K_pv = KEYS[7 + nb]

local function deny(d, axis)
  return { 0, d[2], d[3], d[4], math.max(1, d[5]), d[6] or 0, d[7] or '', axis, '', 0, 0 }
end

-- the provider's hold and pacing first
local pv = pv_look(K_pv, now, pv_spread)
if pv ~= nil and pv.allowed == 0 then return deny({ 0, pv.cap, 0, pv.at, pv.wait }, 'provider') end

-- rate axis (non-consuming look first)
local paid = false
if token ~= '' then
  local valid_at = tonumber(redis.call('ZSCORE', K_bk, token))
  if valid_at ~= nil and now > valid_at + grace then valid_at = nil end  -- past its grace: a plain admit
  if valid_at ~= nil then
    if now < valid_at then
      local d = rate_decide(K_rate, now, cost, P, false, false)
      return deny({ 0, d[2], 0, d[4], math.ceil(valid_at - now), 1, token }, 'rate')
    end
    paid = true
  end
end
local rd = rate_decide(K_rate, now, cost, P, false, false)
if not paid and rd[1] == 0 then
  if book and P.horizon > 0 then
    local d = rate_decide(K_rate, now, cost, P, true, true)
    if d[6] == 1 then
      local valid_at = now + d[5]
      local tok = tostring(valid_at) .. '.' .. tostring(redis.call('ZCARD', K_bk) + 1) .. '.' .. tostring(now)
      redis.call('ZREMRANGEBYSCORE', K_bk, '-inf', now - grace)
      redis.call('ZADD', K_bk, valid_at, tok)
      tg_pexpire(K_bk, d[5] + grace)
      d[7] = tok
      return deny(d, 'rate')
    end
    return deny(d, 'rate')
  end
  return deny(rd, 'rate')
end

-- concurrency axis
local inflight, limit = 0, 0
if holder ~= '' then
  conc_reap(K_leases, K_meta, now)
  limit = math.floor(conc_limit(K_meta, minl, maxl))
  inflight = redis.call('ZCARD', K_leases)
  if inflight >= limit then
    local wait = conc_wait(K_meta, K_wait, now, limit, ttl)
    redis.call('ZADD', K_wait, now + wait, holder)
    tg_pexpire(K_wait, wait + ttl)
    tg_pexpire(K_meta, 7 * 86400000)
    local first = redis.call('ZRANGE', K_leases, 0, 0, 'WITHSCORES')
    local reset = now
    if first[2] then reset = tonumber(first[2]) end
    return deny({ 0, limit, 0, reset, wait, 0, '' }, 'concurrency')
  end
end

-- cost axis
local B = budgets_load(KEYS, 7, ARGV, 14, nb, now)
local bpick = nil
if nb > 0 then
  local ok, pick, retry = budgets_decide(B, now, tokens, escrow and tokens > 0)
  if not ok then return deny(budget_decision(pick, false, retry), 'cost') end
  bpick = pick
end

-- every axis admits: consume
local out
if paid then
  redis.call('ZREM', K_bk, token)
  out = rate_decide(K_rate, now, cost, P, false, false)
else
  out = rate_decide(K_rate, now, cost, P, true, false)
end
pv_take(K_pv, pv)
local axis = 'rate'
local reserved = 0
if nb > 0 then
  if escrow and tokens > 0 then
    budgets_charge(B, now, tokens)
    local rec = { 'tokens', tokens, 'at', now }
    for i = 1, nb do rec[#rec + 1] = 'w' .. i; rec[#rec + 1] = B[i].start end
    redis.call('HSET', K_res, unpack(rec))
    tg_pexpire(K_res, res_ttl)
    reserved = tokens
  end
  out = budget_decision(bpick, true, 0)
  axis = 'cost'
end
local lease, lease_exp = '', 0
if holder ~= '' then
  -- one member per lease: a holder admitted twice in one ms gets the next free acquired_ms
  local acquired = now
  while redis.call('ZSCORE', K_leases, holder .. ':' .. acquired) do acquired = acquired + 1 end
  lease = holder .. ':' .. acquired
  lease_exp = now + ttl
  redis.call('ZADD', K_leases, lease_exp, lease)
  conc_touch(K_leases, ttl * 2)
  redis.call('ZREM', K_wait, holder)
  tg_pexpire(K_meta, 7 * 86400000)
  out = { 1, limit, limit - inflight - 1, lease_exp, 0 }
  axis = 'concurrency'
end
return { 1, out[2], out[3], out[4], 0, 0, '', axis, lease, lease_exp, reserved }
