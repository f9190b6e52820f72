-- Fragment: concurrency leases. Leases: sorted set member "<holder>:<acquired_ms>" -> expiry (epoch-ms);
-- expired leases are reaped on every acquire (and reported as reclaimed by heartbeat/release).
-- Meta hash: lim (adaptive limit, float), hold (EWMA of hold time ms), rc (leases reclaimed).
-- Waiters: sorted set holder -> when it was told to come back (trimmed on use); meta wq: the return cursor.
-- Adaptive limit (min < max): starts at max; a clean release adds 1/floor(lim) (about +1 per `lim` clean
-- releases); a dropped release or a 429 reported (op_report) multiplies by 0.75 (AIMD); always clamped to
-- [min, max].

local function conc_limit(meta, minl, maxl)
  local lim = tonumber(redis.call('HGET', meta, 'lim'))
  if lim == nil then lim = maxl end
  if lim < minl then lim = minl end
  if lim > maxl then lim = maxl end
  return lim
end

-- One AIMD step of the adaptive limit (min < max): a clean release adds 1/floor(lim); a drop (a release with
-- dropped=1, a 429 reported by the provider) multiplies it by 0.75. Returns the new limit.
local function conc_adapt(meta, minl, maxl, dropped)
  local lim = conc_limit(meta, minl, maxl)
  if dropped then lim = lim * 0.75 else lim = lim + 1 / math.floor(lim) end
  if lim < minl then lim = minl end
  if lim > maxl then lim = maxl end
  redis.call('HSET', meta, 'lim', string.format('%.17g', lim))
  tg_pexpire(meta, 7 * 86400000)
  return lim
end

-- Count n reclaimed leases in the meta hash, keeping its expiry (the hash may not exist yet).
local function conc_reclaimed(meta, n)
  stats_add('lx', n)
  redis.call('HINCRBY', meta, 'rc', n)
  tg_pexpire(meta, 7 * 86400000)
end

local function conc_reap(leases, meta, now)
  local n = redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if n > 0 then conc_reclaimed(meta, n) end
  return n
end

-- Estimated wait for a slot. Slots free at about `limit` per mean hold time, so waiters are given return
-- times spaced by hold / limit after the last one handed out (a cursor in meta field wq, like a GCRA TAT):
-- many waiters spread out instead of returning together, and one told to come back too early is re-queued
-- behind those already scheduled. The waiters set (holder -> return time) is kept for operators.
local function conc_wait(meta, waiters, now, limit, ttl)
  redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
  local hold = tonumber(redis.call('HGET', meta, 'hold'))
  if hold == nil then hold = math.min(ttl / 10, 250) end  -- nothing observed yet: guess short, learn fast
  local cursor = tonumber(redis.call('HGET', meta, 'wq'))
  if cursor == nil or cursor < now then cursor = now end
  cursor = cursor + hold / math.max(1, limit)
  redis.call('HSET', meta, 'wq', string.format('%.17g', cursor))
  local wait = math.ceil(cursor - now)
  if wait < 10 then wait = 10 end
  return wait
end

local function conc_touch(key, ms)
  local cur = redis.call('PTTL', key)
  if cur < ms then tg_pexpire(key, ms) end
end
