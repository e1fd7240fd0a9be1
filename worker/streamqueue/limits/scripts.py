"""The Lua scripts that decide, release, pause and renew a queue's model calls atomically in Redis.

They keep the state described in ``streamqueue.limits`` (the pause, GCRA for requests per minute, the
token bucket, the call leases) in the queue's three same-slot keys, on the time of Redis (``TIME``).
"""

from __future__ import annotations

BURST_MS = 10  # the RPM burst: this many milliseconds' worth of calls may start together


def request_burst(requests_per_minute: int) -> int:
    """Calls that may start back to back under ``requests_per_minute``: 10 ms worth, at least 1."""
    return max(1, requests_per_minute * BURST_MS // 60_000)


# Shared by the scripts: the time of Redis in ms, and how long the state hash must outlive ``now``
# (the pause, the RPM schedule, a token debt still refilling), so idle queues leave no keys behind.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'pause_until', 'pause_reason', 'rpm_tat', 'tpm_level', 'tpm_at')
local pause_until = tonumber(s[1]) or 0
local pause_reason = s[2] or 'RetryAfter'
local tat = tonumber(s[3]) or 0
local function tokens_now(tpm)
  local level, at = tonumber(s[4]), tonumber(s[5])
  if level == nil or at == nil then return tpm end
  return math.min(tpm, level + (now - at) * tpm / 60000)
end
local function keep(tpm, level)
  local ms = math.max(pause_until - now, tat - now, 0)
  if tpm > 0 and level < tpm then ms = math.max(ms, (tpm - level) * 60000 / tpm) end
  redis.call('PEXPIRE', KEYS[1], math.ceil(ms) + 1000)
end
"""

# KEYS: state hash, calls zset, bound key. ARGV: want, id prefix, first seq, rpm, burst, tpm,
# concurrent, lease ms, poll ms, bound ttl ms. Returns {granted, wait ms, reason}.
DECIDE = (
    _PRELUDE
    + """
local want, prefix, seq = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local rpm, burst, tpm, conc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local lease, poll, bound_ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local wait, reason = 0, ''
local function bind(ms, why)
  if ms > wait then wait, reason = ms, why end
end
if pause_until > now then bind(pause_until - now, pause_reason) end
local level = tpm
if tpm > 0 then
  level = tokens_now(tpm)
  if level <= 0 then bind(math.floor(-level * 60000 / tpm) + 1, 'TokensPerMinute') end
end
local n = want
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  n = math.min(n, conc - redis.call('ZCARD', KEYS[2]))
  if n <= 0 then bind(poll, 'ConcurrentCalls') end
end
local next_tat = math.max(tat, now)
if rpm > 0 then
  local interval = 60000 / rpm
  local tolerance = (burst - 1) * interval
  local allowed = 0
  while allowed < n and next_tat - now <= tolerance do
    next_tat = next_tat + interval
    allowed = allowed + 1
  end
  n = allowed
  if n == 0 then bind(math.ceil(next_tat - tolerance - now), 'RequestsPerMinute') end
end
if wait > 0 then
  redis.call('SET', KEYS[3], reason, 'PX', bound_ttl)
  return {0, wait, reason}
end
if rpm > 0 then
  tat = next_tat
  redis.call('HSET', KEYS[1], 'rpm_tat', string.format('%.3f', tat))
  keep(tpm, level)
end
if conc > 0 then
  for i = 0, n - 1 do redis.call('ZADD', KEYS[2], now + lease, prefix .. (seq + i)) end
  redis.call('PEXPIRE', KEYS[2], lease * 2)
end
return {n, 0, ''}
"""
)

# KEYS: state hash, calls zset. ARGV: call id, tokens used, tpm. The call's slot frees, its tokens count.
RELEASE = (
    _PRELUDE
    + """
local tokens, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
if tpm > 0 and tokens > 0 then
  local level = tokens_now(tpm) - tokens
  redis.call('HSET', KEYS[1], 'tpm_level', string.format('%.3f', level), 'tpm_at', now)
  keep(tpm, level)
end
return 1
"""
)

# KEYS: state hash, bound key. ARGV: pause ms, reason, tpm, bound ttl ms. Returns the pause left, ms.
PAUSE = (
    _PRELUDE
    + """
local asked = now + tonumber(ARGV[1])
if asked > pause_until then
  pause_until = asked
  redis.call('HSET', KEYS[1], 'pause_until', asked, 'pause_reason', ARGV[2])
end
local tpm = tonumber(ARGV[3])
keep(tpm, tpm > 0 and tokens_now(tpm) or 0)
redis.call('SET', KEYS[2], ARGV[2], 'PX', tonumber(ARGV[4]))
return pause_until - now
"""
)

# KEYS: calls zset. ARGV: lease ms, call ids. Extends leases still held (XX: never revives a lapsed one).
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""
