-- settle.lua: settle one request to its real usage, free its slots, add its usage counters.
-- Idempotent by request id: a request settled within the dedupe window is not settled again.
--
-- KEYS[1] settled request ids (zset: request id -> settle ms)
-- KEYS[2] usage counters of the user's day (hash: "<alias>|<backend>|<counter>" -> int)
-- KEYS, for each of N rate scopes, two keys: tpm bucket (hash), concurrency slots (zset)
-- then, when a quota applies, four more: quota day (hash), quota month (hash),
--   reservations (zset), reserved sum (string)
-- ARGV[1] request id
-- ARGV[2] tokens the admission took (0 when it was admitted without the store)
-- ARGV[3] tokens really used
-- ARGV[4] rate window, ms
-- ARGV[5] dedupe window, ms
-- ARGV[6] usage counters ttl, ms
-- ARGV[7] N
-- ARGV[8 .. 7+N] tpm of each scope (-1: not limited)
-- ARGV[8+N] 1 when a quota applies, else 0; then (if 1) day key ttl ms, month key ttl ms
-- ARGV[after that] F, then F pairs: counter field, increment
--
-- Returns 1 when settled now, 0 when it had been settled already.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local est = tonumber(ARGV[2])
local actual = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local dedupe = tonumber(ARGV[5])
local n = tonumber(ARGV[7])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - dedupe)
if redis.call('ZADD', KEYS[1], 'NX', now, rid) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], dedupe)

for i = 0, n - 1 do
  local tpm = tonumber(ARGV[8 + i])
  local kb = KEYS[3 + 2 * i]
  if tpm > 0 and actual ~= est then
    local b = redis.call('HMGET', kb, 'tokens', 'ts')
    local tokens = tpm
    if b[1] then
      tokens = math.min(tpm, tonumber(b[1]) + (now - tonumber(b[2])) * tpm / window)
    end
    tokens = math.min(tpm, tokens + est - actual)
    redis.call('HSET', kb, 'tokens', tostring(tokens), 'ts', now)
    redis.call('PEXPIRE', kb, math.ceil((tpm - tokens) * window / tpm) + 1000)
  end
  redis.call('ZREM', KEYS[4 + 2 * i], rid)
end

local a = 8 + n
local q = 2 + 2 * n
if tonumber(ARGV[a]) == 1 then
  if est > 0 and redis.call('ZREM', KEYS[q + 3], rid .. '|' .. est) == 1 then
    if redis.call('ZCARD', KEYS[q + 3]) == 0 then
      redis.call('DEL', KEYS[q + 4])
    else
      redis.call('DECRBY', KEYS[q + 4], est)
    end
  end
  if actual > 0 then
    redis.call('HINCRBY', KEYS[q + 1], 'tokens', actual)
    redis.call('PEXPIRE', KEYS[q + 1], tonumber(ARGV[a + 1]))
    redis.call('HINCRBY', KEYS[q + 2], 'tokens', actual)
    redis.call('PEXPIRE', KEYS[q + 2], tonumber(ARGV[a + 2]))
  end
  a = a + 3
else
  a = a + 1
end

local f = tonumber(ARGV[a])
for j = 1, f do
  redis.call('HINCRBY', KEYS[2], ARGV[a + 2 * j - 1], ARGV[a + 2 * j])
end
if f > 0 then redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6])) end
return 1
