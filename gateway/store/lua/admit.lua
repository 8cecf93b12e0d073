-- admit.lua: check every limit of one request and take them all, or take nothing.
--
-- KEYS, for each of N rate scopes (a key, a key x model alias), three keys:
--   rpm log (zset: request id -> admission ms), tpm bucket (hash {tokens, ts}),
--   concurrency slots (zset: request id -> slot expiry ms)
-- then, when a quota applies, four more:
--   quota day (hash {tokens, requests}), quota month (hash {tokens}),
--   reservations (zset: "<request id>|<tokens>" -> expiry ms), reserved sum (string)
-- ARGV[1] request id
-- ARGV[2] estimated tokens of this request (what tpm and the quota reserve)
-- ARGV[3] slot and reservation ttl, ms (refreshed while the request runs)
-- ARGV[4] rate window, ms (60000: rpm is "per rolling minute", tpm refills in one window)
-- ARGV[5] N
-- ARGV[6 .. 5+3N] rpm, tpm, concurrency of each scope (-1: not limited)
-- when a quota applies, ARGV[6+3N ..]: tokens_per_day, tokens_per_month, requests_per_day
--   (-1: not limited), day key ttl ms, month key ttl ms
--
-- Returns {1, remaining requests, limit requests, remaining tokens, limit tokens}
--   (the tightest scope's; -1 when no such limit), or {0, limit, retry after ms, scope index}
--   (scope index -1 for the quota).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local est = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local n = tonumber(ARGV[5])

local req_rem, req_lim, tok_rem, tok_lim = -1, -1, -1, -1
local buckets = {}

-- check: nothing is written before every limit has said yes (pruning expired entries aside)
for i = 0, n - 1 do
  local rpm = tonumber(ARGV[6 + 3 * i])
  local tpm = tonumber(ARGV[7 + 3 * i])
  local conc = tonumber(ARGV[8 + 3 * i])
  if rpm >= 0 then
    local k = KEYS[1 + 3 * i]
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - window)
    local count = redis.call('ZCARD', k)
    if count >= rpm then
      local retry = window
      local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
      if oldest[2] then retry = tonumber(oldest[2]) + window - now end
      return {0, 'rpm', math.max(1, retry), i}
    end
    if req_rem < 0 or rpm - count - 1 < req_rem then
      req_rem = rpm - count - 1
      req_lim = rpm
    end
  end
  if tpm >= 0 then
    if tpm == 0 then return {0, 'tpm', window, i} end
    local b = redis.call('HMGET', KEYS[2 + 3 * i], 'tokens', 'ts')
    local tokens = tpm
    if b[1] then
      tokens = math.min(tpm, tonumber(b[1]) + (now - tonumber(b[2])) * tpm / window)
    end
    -- a request bigger than the whole bucket waits for a full bucket (and leaves a debt)
    local need = math.max(1, math.min(est, tpm))
    if tokens < need then
      return {0, 'tpm', math.max(1, math.ceil((need - tokens) * window / tpm)), i}
    end
    buckets[i] = tokens
    local left = math.floor(tokens - est)
    if left < 0 then left = 0 end
    if tok_rem < 0 or left < tok_rem then
      tok_rem = left
      tok_lim = tpm
    end
  end
  if conc >= 0 then
    local k = KEYS[3 + 3 * i]
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    if redis.call('ZCARD', k) >= conc then return {0, 'concurrency', 1000, i} end
  end
end

local q = 3 * n
local a = 6 + 3 * n
local quota = #KEYS > q
local tpd, tpmo, rpd
if quota then
  tpd, tpmo, rpd = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local kres, ksum = KEYS[q + 3], KEYS[q + 4]
  -- reservations of requests that died (their process stopped refreshing them) expire
  local dead = redis.call('ZRANGEBYSCORE', kres, '-inf', now)
  if #dead > 0 then
    local gone = 0
    for _, m in ipairs(dead) do gone = gone + tonumber(string.match(m, '|(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', kres, '-inf', now)
    redis.call('DECRBY', ksum, gone)
  end
  local reserved = 0
  if redis.call('ZCARD', kres) == 0 then
    redis.call('DEL', ksum)
  else
    reserved = tonumber(redis.call('GET', ksum) or '0')
  end
  local day = redis.call('HMGET', KEYS[q + 1], 'tokens', 'requests')
  local used_day = tonumber(day[1] or '0')
  local req_day = tonumber(day[2] or '0')
  if rpd >= 0 and req_day + 1 > rpd then return {0, 'requests_per_day', 0, -1} end
  if tpd >= 0 and used_day + reserved + est > tpd then return {0, 'tokens_per_day', 0, -1} end
  if tpmo >= 0 then
    local used_month = tonumber(redis.call('HGET', KEYS[q + 2], 'tokens') or '0')
    if used_month + reserved + est > tpmo then return {0, 'tokens_per_month', 0, -1} end
  end
end

-- take
for i = 0, n - 1 do
  local rpm = tonumber(ARGV[6 + 3 * i])
  local tpm = tonumber(ARGV[7 + 3 * i])
  local conc = tonumber(ARGV[8 + 3 * i])
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1 + 3 * i], now, rid)
    redis.call('PEXPIRE', KEYS[1 + 3 * i], window)
  end
  if tpm >= 0 then
    local left = buckets[i] - est
    redis.call('HSET', KEYS[2 + 3 * i], 'tokens', tostring(left), 'ts', now)
    -- a full refill takes (tpm - left) / rate; after that the key would only say "full"
    redis.call('PEXPIRE', KEYS[2 + 3 * i], math.ceil((tpm - left) * window / tpm) + 1000)
  end
  if conc >= 0 then
    redis.call('ZADD', KEYS[3 + 3 * i], now + ttl, rid)
    redis.call('PEXPIRE', KEYS[3 + 3 * i], ttl + 1000)
  end
end
if quota then
  redis.call('HINCRBY', KEYS[q + 1], 'requests', 1)
  redis.call('PEXPIRE', KEYS[q + 1], tonumber(ARGV[a + 3]))
  if est > 0 and (tpd >= 0 or tpmo >= 0) then
    redis.call('ZADD', KEYS[q + 3], now + ttl, rid .. '|' .. est)
    redis.call('INCRBY', KEYS[q + 4], est)
    redis.call('PEXPIRE', KEYS[q + 3], ttl + 1000)
    redis.call('PEXPIRE', KEYS[q + 4], ttl + 1000)
  end
end
return {1, req_rem, req_lim, tok_rem, tok_lim}
