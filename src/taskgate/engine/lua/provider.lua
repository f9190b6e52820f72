-- Fragment: what the provider reported (op_report.lua writes it), enforced on the hot path by check and admit.
-- Hash at the provider key (keys.py: {prefix}:{P:K}:pv, in the slot of the decision's other keys):
--   u    hold until (epoch-ms): every call is denied before it (a 429's Retry-After, an exhausted quota)
--   iv   pacing interval (ms per call, float): the provider's own limit / window, as it last reported it
--   cap  pacing burst (calls): the provider's limit, or less: the most it ever reported remaining (+1) since
--        the limit last changed (providers enforce a per-minute limit in smaller buckets)
--   mr   the most remaining reported since the limit last changed
--   wq   the return cursor of denied callers (see pv_look)
--   lim  the provider's reported limit (per its window)
--   hz   how far ahead denied callers are given return slots (ms; written by op_report)
--   tat  pacing theoretical arrival time (GCRA over iv, cap): synced down to the provider's reported remaining
--   n    429s reported (for operators)
-- No key (nothing reported, or it expired): one EXISTS, nothing else (the hot path of every check: an
-- EXISTS is ~1 us cheaper in Redis than the HMGET of six missing fields, which only a reported key needs).

-- pv_look(key, now, spread) -> nil when the provider has no objection, else { allowed = 0|1, wait, at, cap,
-- tat } (cap: the pacing burst, 0 if unknown; a denial's Decision reports it as its limit). A denial with
-- spread (check, admit; not peek) hands out return times spaced by the pacing interval after the last one
-- handed out (cursor wq, like conc_wait): a backlog comes back in order at the provider's rate instead of
-- all at the hold's end (it writes only on a denial). Slots are handed out up to hz ms ahead (the policy's
-- provider.horizon); a caller beyond it is told to come back then and ask again, so a backlog that waits
-- follows a raised limit within hz instead of keeping the return times of the old one.
-- Pacing is taskgate's own (not a ThrottleKit decision): its comparisons forgive a few ulps of float error.
-- pv_spread: whether admit hands out return slots (the waiting room's ops set it false: a room is one queue,
-- its head comes back when the pacing next has a call, and the slots would only delay it).
local pv_spread = true
local function pv_tol(x)
  local a = math.abs(x)
  if a < 1 then a = 1 end
  return a * 8e-16 + 1e-9
end

local function pv_look(key, now, spread)
  if redis.call('EXISTS', key) == 0 then return nil end
  local h = redis.call('HMGET', key, 'u', 'iv', 'cap', 'tat', 'wq', 'hz')
  if h[1] == false and h[2] == false then return nil end
  local u, iv, cap = tonumber(h[1]), tonumber(h[2]), tonumber(h[3]) or 0
  local at = nil
  local tat = tonumber(h[4]) or now
  if tat < now then tat = now end
  if u ~= nil and u > now then
    at = u
  elseif iv ~= nil then
    local over = tat + iv - now - cap * iv
    if over > pv_tol(tat) then at = now + math.max(1, math.ceil(over - pv_tol(over))) end
  end
  if at == nil then
    if iv == nil then return nil end
    return { allowed = 1, tat = tat + iv }
  end
  if spread and iv ~= nil then
    local base, cursor, hz = at, tonumber(h[5]), tonumber(h[6])
    if cursor ~= nil and cursor > at then at = cursor end
    if hz ~= nil and at > base and at - now > hz then
      at = math.max(base, now + hz)  -- beyond the horizon: come back then and ask again (no slot taken)
    else
      redis.call('HSET', key, 'wq', string.format('%.17g', at + iv))
    end
  end
  at = math.ceil(at)
  return { allowed = 0, wait = at - now, at = at, cap = cap }
end

-- Take one call from the pacing (after every other axis admitted).
local function pv_take(key, look)
  if look ~= nil and look.tat ~= nil then
    redis.call('HSET', key, 'tat', string.format('%.17g', look.tat))
  end
end
