-- Fragment: token budgets (the cost axis). One hash per budget: s (window start, epoch-aligned), c (charged);
-- PEXPIRE to the window end. Windows are aligned to the epoch (now - now % window), like fixedWindow.
-- A policy may have several budgets (e.g. per minute and per day): each is charged the same tokens.

-- budget_read(key, now, budget, window) -> start, charged
local function budget_read(key, now, window)
  local start = now - (now % window)
  local st = redis.call('HMGET', key, 's', 'c')
  local c = 0
  if tonumber(st[1]) == start then c = tonumber(st[2]) or 0 end
  return start, c
end

local function budget_write(key, now, start, window, c)
  if c < 0 then c = 0 end
  redis.call('HSET', key, 's', start, 'c', c)
  tg_pexpire(key, start + window - now)
end

-- Read every budget: B[i] = {key, budget, window, start, charged}
local function budgets_load(keys, first, argv, at, n, now)
  local B = {}
  for i = 1, n do
    local budget, window = tonumber(argv[at + 2 * (i - 1)]), tonumber(argv[at + 2 * (i - 1) + 1])
    local key = keys[first + i - 1]
    local start, c = budget_read(key, now, window)
    B[i] = { key = key, budget = budget, window = window, start = start, c = c }
  end
  return B
end

-- The decision over all budgets. strict=true (escrow): admitted iff charged + tokens <= budget in every
-- budget. strict=false (debit, ThrottleKit's crossing semantics): admitted iff budget remains before it.
-- Returns allowed, the reported budget (the tightest), retry_after.
local function budgets_decide(B, now, tokens, strict)
  local allowed, retry, pick, pick_rem = true, 0, nil, nil
  for i = 1, #B do
    local b = B[i]
    local ok
    if strict then ok = (b.c + tokens <= b.budget) else ok = (b.c < b.budget) end
    if not ok then
      allowed = false
      local r = b.start + b.window - now
      if r > retry then retry = r; pick = b end
    end
  end
  if allowed then
    for i = 1, #B do
      local rem = B[i].budget - B[i].c
      if pick_rem == nil or rem < pick_rem then pick, pick_rem = B[i], rem end
    end
  end
  return allowed, pick, retry
end

local function budgets_charge(B, now, tokens)
  for i = 1, #B do
    B[i].c = B[i].c + tokens
    budget_write(B[i].key, now, B[i].start, B[i].window, B[i].c)
  end
end

-- The Decision of a budget after the fact
local function budget_decision(b, allowed, retry, tokens_after)
  local rem = b.budget - b.c
  if rem < 0 then rem = 0 end
  local a = 0
  if allowed then a = 1 end
  return { a, b.budget, rem, b.start + b.window, retry, 0, '' }
end
