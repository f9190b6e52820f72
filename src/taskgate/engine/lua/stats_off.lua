-- Fragment: counters off (a policy with `counters: false`, or an operation that counts nothing): the hooks
-- the other fragments call are no-ops, and NK / NA are the whole KEYS / ARGV (see stats.lua).
local NK, NA = #KEYS, #ARGV
local function stats_add(c, n) end
