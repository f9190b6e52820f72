-- op check: consume (check, check_many), peek, or redeem-a-booking (and book on a denial), on one strategy.
-- One script per policy: its constants are TG_CONST (engine/__init__.py writes them into the source), so a
-- call carries only what varies.
-- TG_CONST [1] booking grace ms  [2..] strategy params (see the rate fragment)
-- KEYS  mode c|p: KEYS[1..n] rate keys (check_many: all in one call, one instant), KEYS[n+1..2n] their
--       provider keys (provider.lua)
--       mode b|t: KEYS[1] rate key, KEYS[2] bookings (sorted set: token -> valid_at), KEYS[3] provider key
-- ARGV  [1] now (epoch-ms; 0 = Redis TIME)  [2] mode c (consume) | p (peek) | b (redeem the token if any,
--       else consume or book) | t (redeem the token if any, else consume; never book)  [3] cost
--       mode b|t only: [4] booking token to redeem ("" none); a token past valid_at + grace is no token
-- Reply per key, flattened: allowed(1/0), limit, remaining, reset_at, retry_after_ms, booked(1/0), token("")
-- A provider hold or pacing (provider.lua) denies first: limit = the provider's reported limit (0 unknown),
-- remaining 0, reset_at and retry_after to the hold's end.
-- Counters (policy `counters: true`): stats.lua wraps this body and adds its KEYS and one ARGV after these.
local now = tg_now(ARGV[1])
local mode = ARGV[2]
local cost = tonumber(ARGV[3])
local P = rate_params(TG_CONST, 2)
local function pv_deny(pv) return { 0, pv.cap, 0, pv.at, pv.wait, 0, '' } end
if mode == 'b' or mode == 't' then
  local key, bk, token, grace = KEYS[1], KEYS[2], ARGV[4], tonumber(TG_CONST[1])
  local pv = pv_look(KEYS[3], now, true)
  if pv ~= nil and pv.allowed == 0 then return pv_deny(pv) end
  if token ~= '' then
    local valid_at = tonumber(redis.call('ZSCORE', bk, token))
    if valid_at ~= nil and now > valid_at + grace then valid_at = nil end  -- past its grace: no token
    if valid_at ~= nil then
      if now < valid_at then
        local d = rate_decide(key, now, cost, P, false, false)
        return { 0, d[2], 0, d[4], math.ceil(valid_at - now), 1, token }
      end
      redis.call('ZREM', bk, token)
      pv_take(KEYS[3], pv)
      local d = rate_decide(key, now, cost, P, false, false)
      return { 1, d[2], d[3], d[4], 0, 0, '' }
    end
  end
  local d = rate_decide(key, now, cost, P, true, mode == 'b')
  if d[1] == 1 then pv_take(KEYS[3], pv) end
  if d[6] == 1 then
    local valid_at = now + d[5]
    local tok = tostring(valid_at) .. '.' .. tostring(redis.call('ZCARD', bk) + 1) .. '.' .. tostring(now)
    redis.call('ZREMRANGEBYSCORE', bk, '-inf', now - grace)
    redis.call('ZADD', bk, valid_at, tok)
    tg_pexpire(bk, d[5] + grace)
    d[7] = tok
    return d
  end
  d[7] = ''
  return d
end
local consume = (mode == 'c')
local n = NK / 2
if n == 1 then  -- check, peek: the decision as it is (no copy)
  local pv = pv_look(KEYS[2], now, consume)
  if pv ~= nil and pv.allowed == 0 then return pv_deny(pv) end
  local d = rate_decide(KEYS[1], now, cost, P, consume, false)
  if consume and d[1] == 1 then pv_take(KEYS[2], pv) end
  d[7] = ''
  return d
end
local out = {}
for i = 1, n do
  local pv = pv_look(KEYS[n + i], now, consume)
  local d
  if pv ~= nil and pv.allowed == 0 then
    d = pv_deny(pv)
  else
    d = rate_decide(KEYS[i], now, cost, P, consume, false)
    if consume and d[1] == 1 then pv_take(KEYS[n + i], pv) end
  end
  for j = 1, 6 do out[#out + 1] = d[j] end
  out[#out + 1] = ''
end
return out
