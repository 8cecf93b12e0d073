-- refresh.lua: keep the slots and reservations of live requests from expiring.
-- A request whose process dies stops being refreshed, and its slot frees itself.
--
-- KEYS[i] a sorted set whose scores are expiry times (ms), or a key that only needs its ttl
--   pushed (all KEYS of one call share a hash slot)
-- ARGV[1] ttl, ms
-- ARGV[1+i] the member of KEYS[i] to push to now + ttl ("" for a key that only needs its ttl)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  if ARGV[1 + i] ~= '' then redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[1 + i]) end
  if redis.call('PTTL', KEYS[i]) < ttl + 1000 then redis.call('PEXPIRE', KEYS[i], ttl + 1000) end
end
return #KEYS
