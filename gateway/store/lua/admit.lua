-- admit.lua: check every limit of one request and take them all, or take nothing.
--
-- KEYS, for each of N rate scopes (a key, a key x model alias), three keys:
--   rpm log (zset: request id -> admission ms), tpm bucket (hash {tokens, ts, and the expiry
--   bookkeeping below}), concurrency slots (zset: request id -> slot expiry ms)
-- then, when a quota applies, four more:
--   quota day (hash {tokens, requests, x}), quota month (hash {tokens}),
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
--
-- Key expiries are not pushed on every request: a key's expiry is set (PEXPIREAT, with one
-- period of slack) when the key is created or when its bookkeeping says the expiry would
-- come too early. The bookkeeping is read with hashes the script reads anyway: the tpm
-- bucket keeps the expiry of itself (x), of the rpm log (xr) and of the slots (xs); the
-- quota day keeps that of the reservations and their sum (x). Without a tpm bucket the rpm
-- log and the slots get their expiry pushed on every admission, as before.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local est = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local n = tonumber(ARGV[5])

local req_rem, req_lim, tok_rem, tok_lim = -1, -1, -1, -1
local buckets, marks, fresh_rpm, fresh_slots = {}, {}, {}, {}

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
    fresh_rpm[i] = count == 0
    if req_rem < 0 or rpm - count - 1 < req_rem then
      req_rem = rpm - count - 1
      req_lim = rpm
    end
  end
  if tpm >= 0 then
    if tpm == 0 then return {0, 'tpm', window, i} end
    local b = redis.call('HMGET', KEYS[2 + 3 * i], 'tokens', 'ts', 'x', 'xr', 'xs')
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
    marks[i] = {tonumber(b[3] or '0'), tonumber(b[4] or '0'), tonumber(b[5] or '0')}
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
    local held = redis.call('ZCARD', k)
    if held >= conc then return {0, 'concurrency', 1000, i} end
    fresh_slots[i] = held == 0
  end
end

local q = 3 * n
local a = 6 + 3 * n
local quota = #KEYS > q
local tpd, tpmo, rpd, res_mark, res_fresh
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
  res_fresh = redis.call('ZCARD', kres) == 0
  if res_fresh then
    redis.call('DEL', ksum)
  else
    local sum = redis.call('GET', ksum)
    if sum then reserved = tonumber(sum) else res_fresh = true end
  end
  local day = redis.call('HMGET', KEYS[q + 1], 'tokens', 'requests', 'x')
  local used_day = tonumber(day[1] or '0')
  local req_day = tonumber(day[2] or '0')
  res_mark = tonumber(day[3] or '0')
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
  local m = marks[i]
  local kb = KEYS[2 + 3 * i]
  local set = {}
  if rpm >= 0 then
    local k = KEYS[1 + 3 * i]
    redis.call('ZADD', k, now, rid)
    -- the log must outlive its newest entry by one window
    if not m then
      redis.call('PEXPIRE', k, window)
    elseif fresh_rpm[i] or m[2] < now + window then
      local x = now + 2 * window
      redis.call('PEXPIREAT', k, x)
      set[#set + 1] = 'xr'
      set[#set + 1] = x
    end
  end
  if conc >= 0 then
    local k = KEYS[3 + 3 * i]
    redis.call('ZADD', k, now + ttl, rid)
    -- the slots must outlive their latest expiry
    if not m then
      redis.call('PEXPIRE', k, ttl + 1000)
    elseif fresh_slots[i] or m[3] < now + ttl + 1000 then
      local x = now + 2 * ttl + 1000
      redis.call('PEXPIREAT', k, x)
      set[#set + 1] = 'xs'
      set[#set + 1] = x
    end
  end
  if tpm >= 0 then
    local left = buckets[i] - est
    -- a full refill takes (tpm - left) / rate; after that the key would only say "full"
    local need = now + math.ceil((tpm - left) * window / tpm) + 1000
    if m[1] < need then
      set[#set + 1] = 'x'
      set[#set + 1] = need + window
    end
    redis.call('HSET', kb, 'tokens', tostring(left), 'ts', now, unpack(set))
    if m[1] < need then redis.call('PEXPIREAT', kb, need + window) end
  end
end
if quota then
  if redis.call('HINCRBY', KEYS[q + 1], 'requests', 1) == 1 then
    redis.call('PEXPIRE', KEYS[q + 1], tonumber(ARGV[a + 3]))
  end
  if est > 0 and (tpd >= 0 or tpmo >= 0) then
    redis.call('ZADD', KEYS[q + 3], now + ttl, rid .. '|' .. est)
    redis.call('INCRBY', KEYS[q + 4], est)
    -- the reservations and their sum must outlive the latest reservation
    if res_fresh or res_mark < now + ttl + 1000 then
      local x = now + 2 * ttl + 1000
      redis.call('PEXPIREAT', KEYS[q + 3], x)
      redis.call('PEXPIREAT', KEYS[q + 4], x)
      redis.call('HSET', KEYS[q + 1], 'x', x)
    end
  end
end
return {1, req_rem, req_lim, tok_rem, tok_lim}
