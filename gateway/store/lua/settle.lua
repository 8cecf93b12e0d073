-- settle.lua: settle one request to its real usage, free its slots, add its usage counters.
-- Idempotent by request id: a request settled within the dedupe window is not settled again.
-- (The usage event and the day's user index live outside the user's hash slot: the caller
-- writes them in the same pipeline.)
--
-- KEYS[1] settled request ids (zset: request id -> settle ms)
-- KEYS, for each of N rate scopes, two keys: tpm bucket (hash), concurrency slots (zset)
-- then, when a quota applies, four more: quota day (hash), quota month (hash),
--   reservations (zset), reserved sum (string)
-- KEYS[#KEYS] usage counters of the user's day (hash: "<alias>|<backend>|<counter>" -> int)
-- ARGV[1] request id
-- ARGV[2] tokens the admission took (0 when it was admitted without the store)
-- ARGV[3] tokens really used
-- ARGV[4] counter field prefix, "<alias>|<backend>|"
-- ARGV[5 .. 11] the counts to add, in the order of COUNTERS below (0: not written)
-- ARGV[12] rate window, ms
-- ARGV[13] dedupe window, ms
-- ARGV[14] usage counters ttl, ms
-- ARGV[15] N
-- ARGV[16 .. 15+2N] tpm, concurrency of each scope (-1: not limited)
-- ARGV[16+2N] 1 when a quota applies, else 0; then (if 1) day key ttl ms, month key ttl ms
--
-- Returns 0 when the request had been settled already, else 1, or 2 when this call created
-- the day's counter field "<alias>|<backend>|requests" (the counters hash may be new: the
-- caller makes sure the user is in the day's index).
-- Day, month and counters keys get their ttl when created (their first field appears), the
-- tpm bucket when its bookkeeping (x) says it would expire before it refilled (see admit.lua).

local COUNTERS = {'requests', 'prompt_tokens', 'completion_tokens', 'reported_tokens',
                  'estimated_tokens', 'cache_hits', 'errors'}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local est = tonumber(ARGV[2])
local actual = tonumber(ARGV[3])
local window = tonumber(ARGV[12])
local dedupe = tonumber(ARGV[13])
local n = tonumber(ARGV[15])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - dedupe)
if redis.call('ZADD', KEYS[1], 'NX', now, rid) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], dedupe)

for i = 0, n - 1 do
  local tpm = tonumber(ARGV[16 + 2 * i])
  local kb = KEYS[2 + 2 * i]
  if tpm > 0 and actual ~= est then
    local b = redis.call('HMGET', kb, 'tokens', 'ts', 'x')
    local tokens = tpm
    if b[1] then
      tokens = math.min(tpm, tonumber(b[1]) + (now - tonumber(b[2])) * tpm / window)
    end
    tokens = math.min(tpm, tokens + est - actual)
    local need = now + math.ceil((tpm - tokens) * window / tpm) + 1000
    if tonumber(b[3] or '0') < need then
      redis.call('HSET', kb, 'tokens', tostring(tokens), 'ts', now, 'x', need + window)
      redis.call('PEXPIREAT', kb, need + window)
    else
      redis.call('HSET', kb, 'tokens', tostring(tokens), 'ts', now)
    end
  end
  if tonumber(ARGV[17 + 2 * i]) >= 0 then redis.call('ZREM', KEYS[3 + 2 * i], rid) end
end

local a = 16 + 2 * n
local q = 1 + 2 * n
if tonumber(ARGV[a]) == 1 then
  if est > 0 and redis.call('ZREM', KEYS[q + 3], rid .. '|' .. est) == 1 then
    if redis.call('DECRBY', KEYS[q + 4], est) <= 0 then redis.call('DEL', KEYS[q + 4]) end
  end
  if actual > 0 then
    if redis.call('HINCRBY', KEYS[q + 1], 'tokens', actual) == actual then
      redis.call('PEXPIRE', KEYS[q + 1], tonumber(ARGV[a + 1]))
    end
    if redis.call('HINCRBY', KEYS[q + 2], 'tokens', actual) == actual then
      redis.call('PEXPIRE', KEYS[q + 2], tonumber(ARGV[a + 2]))
    end
  end
end

local kc = KEYS[#KEYS]
local prefix = ARGV[4]
local created, first = false, true
for j = 1, 7 do
  local inc = tonumber(ARGV[4 + j])
  if inc ~= 0 then
    local v = redis.call('HINCRBY', kc, prefix .. COUNTERS[j], inc)
    if first and v == inc then created = true end
    first = false
  end
end
if created then
  redis.call('PEXPIRE', kc, tonumber(ARGV[14]))
  return 2
end
return 1
