-- op stats: write counters that decisions collected elsewhere (Redis Cluster, when a policy's stats keys are
-- in another hash slot than its decisions: see stats.lua and taskgate/engine/keys.py). Composed with
-- stats.lua in mode inline; the client sums deltas per (policy, second) before sending them.
-- KEYS  [1..5] the policy's stats keys: counts, denied0, denied1, spent0, spent1
-- ARGV  [1] now (epoch-ms, any ms of the second counted; 0 = TIME)  [2] nc  then (counter, n) x nc, nd,
--       (member, denials) x nd, ns, (member, tokens) x ns
-- Reply 1
return stats_finish('stats', nil)
