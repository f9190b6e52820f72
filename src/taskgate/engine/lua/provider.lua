-- Fragment: what the provider reported (op_report.lua writes it), enforced on the hot path by check and admit.
-- Hash at the provider key (keys.py: {prefix}:{P:K}:pv, in the slot of the decision's other keys):
--   u    hold until (epoch-ms): every call is denied before it (a 429's Retry-After, an exhausted quota)
--   iv   pacing interval (ms per call, float): the provider's own limit / window, as it last reported it
--   cap  pacing burst (calls): the provider's limit
--   tat  pacing theoretical arrival time (GCRA over iv, cap): synced down to the provider's reported remaining
--   n    429s reported (for operators)
-- No key (nothing reported, or it expired): one HMGET of a missing key, nothing else.

-- pv_look(key, now) -> nil when the provider has no objection, else { allowed = 0|1, wait, at, cap, tat }
-- (cap: the provider's reported limit, 0 if unknown; a denial's Decision reports it as its limit)
local function pv_look(key, now)
  local h = redis.call('HMGET', key, 'u', 'iv', 'cap', 'tat')
  if h[1] == false and h[2] == false then return nil end
  local u = tonumber(h[1])
  if u ~= nil and u > now then return { allowed = 0, wait = u - now, at = u, cap = tonumber(h[3]) or 0 } end
  local iv = tonumber(h[2])
  if iv == nil then return nil end
  local cap = tonumber(h[3]) or 1
  local tat = tonumber(h[4]) or now
  if tat < now then tat = now end
  local nxt = tat + iv
  local over = nxt - now - cap * iv
  if over > tg_tol(nxt) then
    local wait = tg_ceil(over)
    if wait < 1 then wait = 1 end
    return { allowed = 0, wait = wait, at = now + wait, cap = cap }
  end
  return { allowed = 1, tat = nxt }
end

-- Take one call from the pacing (after every other axis admitted).
local function pv_take(key, look)
  if look ~= nil and look.tat ~= nil then
    redis.call('HSET', key, 'tat', string.format('%.17g', look.tat))
  end
end
