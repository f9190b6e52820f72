-- Fragment: operating counters, kept by the engine itself per policy and per second (the key layout and the
-- Redis Cluster choice are documented in taskgate/engine/keys.py).
--
-- Composed right after common.lua into the counted operations (check, admit, release, heartbeat, debit,
-- reserve, settle) of a policy with `counters: true` (the default). The operation's body is wrapped:
--     local function tg_op() <op_*.lua> end
--     return stats_finish('<op>', tg_op())
-- so no decision code changes: stats_finish counts the operation's reply (and the reclaims conc.lua reports
-- through stats_add). NK / NA are the operation's own KEYS / ARGV counts, without the stats ones.
-- Counted: check (not peek) and admit, debit, reserve: allowed, or denied by axis (+ booked when the denial
-- took a future slot, + its retry_after_ms); admit: leases acquired, tokens reserved (escrow); debit: tokens
-- charged; reserve: tokens reserved; settle: tokens charged (an excess) or refunded; release: a lease
-- released; reclaimed leases wherever conc.lua reclaims them (admit's reaping, release, heartbeat); report:
-- a 429 reported, and the ms of hold it added.
--
-- KEYS  mode inline: the op's keys, then the policy's [counts, denied0, denied1, spent0, spent1] (NSK = 5), or
--       the first three (NSK = 3) for a policy without a token budget (it never spends)
--       mode collect: the op's keys only
-- ARGV  the op's ARGV, then ONE stats argument: for check, the byte length of a rate key before the caller's
--       key (the member of KEYS[i] is cut out of its name, "{prefix}:{P:K}:r" or "{prefix}:{P}:K:r"); for
--       the other ops the caller's key, escaped as in keys.py ("" for release and heartbeat).
-- Reply mode inline: the op's reply, unchanged. mode collect: {the op's reply, deltas} with deltas =
--       {now, nc, (counter, n) x nc, nd, (member, denials) x nd, ns, (member, tokens) x ns}, which is the ARGV
--       of op_stats.lua: the client sends them later, summed (keys.py says when).
--
-- Counts hash (one per policy): "<second>:<c>" = the count of counter c in that second (epoch-s); the
-- seconds that leave the last SLOTS are rolled up into "T:<c>" and deleted, "R" = the last second rolled up.
-- So total(c) = T:c + every second's c (monotonic while the hash lives) and the hash holds at most SLOTS + 1
-- seconds of the fixed set of counters. The roll-up runs only when a call creates a field (the first count
-- of its kind in a second), so an allowed check costs one HINCRBY; a count for a second already rolled up
-- (an explicit clock in the past) goes to the totals. PEXPIRE TTL at each roll-up.
-- Top sets (two per kind, one per minute in turn): "E:d<i>" / "E:s<i>" in the counts hash = the minute
-- (epoch-min) held by set i; a set is emptied when reused, ZINCRBY'd, trimmed back to the TOP highest when
-- it doubles, and expires two minutes after it was started. Denied keys count denials; spenders count tokens.
-- Cost of an allowed check: one HINCRBY (a new second: + HGET, HMGET, HINCRBY per non-zero count, HDEL, HSET,
-- PEXPIRE); a denial adds HGET + ZINCRBY (+ ZCARD for a new member). The fragment defines as few functions as
-- it can (three): every closure is built again on every call, ~0.2-0.4 us each in Redis' Lua.

local ST_MODE = '@MODE@'
local NK, NA = #KEYS, #ARGV - 1
if ST_MODE == 'inline' then NK = NK - @NSK@ end
local ST_C = {}
local ST_NOW = nil

-- The operation's clock is the counters' clock: this shadows common.lua's tg_now for the op.
local tg_now_base = tg_now
local function tg_now(argv_now)
  ST_NOW = tg_now_base(argv_now)
  return ST_NOW
end

local function stats_add(c, n)
  if n ~= nil and n ~= 0 then ST_C[c] = (ST_C[c] or 0) + n end
end

-- Count the reply r of op (op 'stats': the counts in ARGV, see op_stats.lua), then write the counts to the
-- stats keys (inline) or return them with r (collect).
local function stats_finish(op, r)
  local C, D, S = ST_C, nil, nil  -- denied keys and spenders: tables only when there are some
  local now = ST_NOW
  local sa = ARGV[#ARGV]
  if op == 'stats' then
    now = tg_now_base(ARGV[1])
    D, S = {}, {}
    local i = 2
    for _, M in ipairs({ C, D, S }) do
      local n = tonumber(ARGV[i])
      for j = 1, n do M[ARGV[i + 2 * j - 1]] = tonumber(ARGV[i + 2 * j]) end
      i = i + 2 * n + 1
    end
  elseif op == 'check' then
    if ARGV[2] ~= 'p' then
      for i = 1, #r / 7 do
        local j = (i - 1) * 7
        if r[j + 1] == 1 then
          C['a'] = (C['a'] or 0) + 1
        else
          C['dr'] = (C['dr'] or 0) + 1
          C['w'] = (C['w'] or 0) + r[j + 5]
          if r[j + 6] == 1 and r[j + 7] ~= ARGV[4] then C['bk'] = (C['bk'] or 0) + 1 end
          local k = KEYS[i]
          local tail = 2
          if string.sub(k, -3, -3) == '}' then tail = 3 end
          local m = string.sub(k, tonumber(sa) + 1, -tail - 1)
          D = D or {}
          D[m] = (D[m] or 0) + 1
        end
      end
    end
  else
    -- one decision (admit, debit, reserve) or an accounting (settle, release) on key sa
    local allowed, axis, retry, spent = nil, 'rate', 0, 0
    if op == 'admit' then
      allowed = r[1] == 1
      if allowed then
        if r[9] ~= '' then stats_add('la', 1) end
        spent = r[11]
        stats_add('tr', spent)
      else
        axis, retry = r[8], r[5]
        if r[6] == 1 and r[7] ~= ARGV[10] then stats_add('bk', 1) end
      end
    elseif op == 'debit' or op == 'reserve' then
      allowed = r[1] == 1
      if allowed then
        spent = tonumber(ARGV[2])
        if op == 'debit' then stats_add('tc', spent) else stats_add('tr', spent) end
      else
        axis, retry = 'cost', r[5]
      end
    elseif op == 'settle' then
      spent = r[8]
      stats_add('tc', spent)
      stats_add('tf', r[9])
    elseif op == 'release' then
      if r == 1 then stats_add('lr', 1) end
    elseif op == 'report' then
      if ARGV[4] == '1' then stats_add('pr', 1) end
      stats_add('ph', r[9])
    end
    if allowed == true then
      stats_add('a', 1)
    elseif allowed == false then
      if axis == 'concurrency' then stats_add('dc', 1) elseif axis == 'cost' then stats_add('dk', 1)
      elseif axis == 'provider' then stats_add('dp', 1) else stats_add('dr', 1) end
      stats_add('w', retry)
      if sa ~= '' then D = { [sa] = 1 } end
    end
    if spent > 0 and sa ~= '' then S = { [sa] = spent } end
  end
  if ST_MODE == 'collect' then
    local out = { now }
    for _, M in ipairs({ C, D or {}, S or {} }) do
      local at, n = #out + 1, 0
      out[at] = 0
      for m, v in pairs(M) do
        out[#out + 1] = m
        out[#out + 1] = v
        n = n + 1
      end
      out[at] = n
    end
    return { r, out }
  end
  local ring = KEYS[NK + 1]
  if next(C) ~= nil then
    local sec = math.floor(now / 1000)
    local pre = sec .. ':'
    local new = false
    for c, n in pairs(C) do
      if redis.call('HINCRBY', ring, pre .. c, n) == n then new = true end
    end
    if new then
      -- a field was created: the first count of its kind in this second. Roll the seconds that left the
      -- window into the totals: fields exist only in (R, R + SLOTS] (each new one comes through here).
      local R = tonumber(redis.call('HGET', ring, 'R'))
      local upto = sec - @SLOTS@
      if R == nil or R < upto then
        if R ~= nil then
          local names = { @COUNTERS@ }
          local f = {}
          for s = R + 1, math.min(upto, R + @SLOTS@) do
            for _, c in ipairs(names) do f[#f + 1] = s .. ':' .. c end
          end
          local old = redis.call('HMGET', ring, unpack(f))
          local sum = {}
          for i = 1, #f do
            local v = tonumber(old[i])
            if v ~= nil then
              local c = names[(i - 1) % #names + 1]
              sum[c] = (sum[c] or 0) + v
            end
          end
          for c, v in pairs(sum) do redis.call('HINCRBY', ring, 'T:' .. c, v) end
          redis.call('HDEL', ring, unpack(f))
        end
        redis.call('HSET', ring, 'R', upto)
        redis.call('PEXPIRE', ring, @TTL_MS@)
      elseif sec <= R then
        -- a second already rolled up (an explicit clock in the past): straight into the totals
        for c, n in pairs(C) do
          redis.call('HINCRBY', ring, 'T:' .. c, n)
          redis.call('HDEL', ring, pre .. c)
        end
      end
    end
  end
  -- top sets: denied keys (KEYS[NK+2], [NK+3]) and spenders ([NK+4], [NK+5]), one per minute in turn
  for t = 0, 1 do
    local M, tag = D, 'd'
    if t == 1 then M, tag = S, 's' end
    if M ~= nil then
      local e = math.floor(now / @EPOCH_MS@)
      local i = e % 2
      local z = KEYS[NK + 2 + 2 * t + i]
      local f = 'E:' .. tag .. i
      local held = tonumber(redis.call('HGET', ring, f))
      if held == nil or held <= e then  -- (a minute older than the set's is not ranked)
        if held ~= e then
          redis.call('DEL', z)
          redis.call('HSET', ring, f, e)
          redis.call('PEXPIRE', ring, @TTL_MS@)
        end
        local grew = false
        for m, n in pairs(M) do
          if tonumber(redis.call('ZINCRBY', z, n, m)) == n then grew = true end
        end
        if held ~= e then
          redis.call('PEXPIRE', z, 2 * @EPOCH_MS@ + 10000)
        elseif grew and redis.call('ZCARD', z) > 2 * @TOP@ then
          redis.call('ZREMRANGEBYRANK', z, 0, -@TOP@ - 1)
        end
      end
    end
  end
  if op == 'stats' then return 1 end
  return r
end
