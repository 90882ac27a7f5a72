"""The bus's Redis scripts: each state change of a topic or group is one script,
so it is atomic, and costs one round trip.

Why scripts and not MULTI: the steps depend on what Redis holds (is the key
already published? is this delivery still the consumer's?), and a script
reads and writes in one indivisible step. The scripts work on Redis 6.2 and
7.x alike: they never rely on XAUTOCLAIM returning entry bodies (6.2 returns
nil for deleted ones and keeps them pending; 7.0 drops them and lists their
ids), and never on Lua's math.random (6.2 seeds it identically every run).

Stream entry fields: ``e`` the envelope (its id empty: the entry id is the
event id), ``k`` the idempotency key digest, ``t`` the type, ``tp`` the
traceparent, ``a`` the actor subject; a redriven copy adds ``eid`` (the
original event id) and ``g`` (the only group it is for).

A group's state, beside its Redis consumer group:
- ``meta`` hash: retry policy, ``vis_ms``, dedup generation ``gen``, the
  XAUTOCLAIM cursor and the counters;
- ``att`` hash: entry id -> deliveries made so far, for entries delivered
  more than once or waiting to be retried (absent means one);
- ``retry`` zset: entries waiting for a retry (or a replay), scored by when
  they are due; they are not pending in the Redis group meanwhile, so the
  visibility-timeout reclaim (XAUTOCLAIM) never touches them;
- ``d:<key digest>`` strings: consumer dedup, ``p:<entry id>`` while an
  entry with that key is being processed (expires with its lease), then
  ``d:<gen>`` once processed (expires after at least the retention age).
"""

from __future__ import annotations

PRELUDE = """
local function field(f, name)
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

-- deliveries made of a pending entry: 1 unless it was retried
local function attempt_of(att, id)
  return tonumber(redis.call('HGET', att, id) or '1')
end

-- is the entry pending for this consumer, at this attempt? (a stale delivery id is not)
local function held(stream, group, att, id, consumer, attempt)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p > 0 and p[1][2] == consumer and attempt_of(att, id) == attempt
end

local function entry(stream, id)
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then return nil end
  return e[1][2]
end

-- end the processing lease of an entry's idempotency key, if this entry holds it
local function release(dp, f, id)
  local k = f and field(f, 'k')
  if k and redis.call('GET', dp .. k) == 'p:' .. id then redis.call('DEL', dp .. k) end
end

local function audit(outbox, on, topic, group, consumer, id, f, attempt, outcome, reason, by, now)
  if on ~= '1' then return end
  f = f or {}
  -- never trimmed: a record leaves only once the audit log has it
  redis.call('XADD', outbox, '*',
    'o', outcome, 'topic', topic, 'group', group, 'consumer', consumer,
    'eid', field(f, 'eid') or id, 't', field(f, 't') or '', 'attempt', attempt,
    'reason', reason, 'tp', field(f, 'tp') or '', 'a', field(f, 'a') or '', 'by', by, 'time', now)
end

local function cmp_id(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  if am ~= bm then return am < bm and -1 or 1 end
  if as ~= bs then return as < bs and -1 or 1 end
  return 0
end
"""

#: Append events, deduplicated by idempotency key, and trim to retention.
#: KEYS: stream. ARGV: maxlen, minid ('' = none), window ms, dedup key prefix,
#: then two per event: "key digest\tcontent digest\ttype\ttraceparent\tactor"
#: and the envelope (few arguments: packing them is most of a batch's cost).
#: Returns "id1 id2+ ..." ('+' marks a duplicate), or "conflict <index>" (a
#: reused key with other content; nothing is written).
PUBLISH = """
local stream, maxlen, minid, window, ip = KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local meta = {}
for i = 5, #ARGV, 2 do
  local k, c, t, tp, a = string.match(ARGV[i], '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
  meta[#meta + 1] = {k, c, t, tp, a, ARGV[i + 1]}
end
for n, m in ipairs(meta) do
  local prior = redis.call('GET', ip .. m[1])
  if prior and string.sub(prior, string.find(prior, ' ', 1, true) + 1) ~= m[2] then
    return 'conflict ' .. (n - 1)
  end
end
local out, added = {}, false
for _, m in ipairs(meta) do
  local key = ip .. m[1]
  local prior = redis.call('GET', key)
  if prior then
    out[#out + 1] = string.sub(prior, 1, string.find(prior, ' ', 1, true) - 1) .. '+'
  else
    local id
    if maxlen > 0 then
      id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'k', m[1], 't', m[3], 'tp', m[4], 'a', m[5], 'e', m[6])
    else
      id = redis.call('XADD', stream, '*', 'k', m[1], 't', m[3], 'tp', m[4], 'a', m[5], 'e', m[6])
    end
    redis.call('SET', key, id .. ' ' .. m[2], 'PX', window)
    out[#out + 1] = id
    added = true
  end
end
if added and minid ~= '' then redis.call('XTRIM', stream, 'MINID', '~', minid) end
return table.concat(out, ' ')
"""

#: Fix a topic's partition count unless it is fixed already (CreateTopic).
#: KEYS: the partitions hash. ARGV: topic, count.
#: Returns the count fixed now (> 0), or minus the count it already had.
FIX_PARTITIONS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then return -tonumber(cur) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return tonumber(ARGV[2])
"""

#: Create a consumer group if missing and record its settings.
#: KEYS: stream, meta. ARGV: group, start id, now ms, vis ms, replace vis
#: ('1'/'0': else only fill in), replace policy ('1'/'0'), then policy field/value pairs.
#: Returns 1 when the group was created, 0 when it existed.
GROUP_INIT = """
local stream, meta = KEYS[1], KEYS[2]
local r = redis.pcall('XGROUP', 'CREATE', stream, ARGV[1], ARGV[2], 'MKSTREAM')
local created = 1
if type(r) == 'table' and r.err then
  if not string.find(r.err, 'BUSYGROUP', 1, true) then return redis.error_reply(r.err) end
  created = 0
end
redis.call('HSETNX', meta, 'created', ARGV[3])
redis.call('HSETNX', meta, 'gen', '0')
if ARGV[5] == '1' then redis.call('HSET', meta, 'vis_ms', ARGV[4])
else redis.call('HSETNX', meta, 'vis_ms', ARGV[4]) end
for i = 7, #ARGV, 2 do
  if ARGV[6] == '1' then redis.call('HSET', meta, ARGV[i], ARGV[i + 1])
  else redis.call('HSETNX', meta, ARGV[i], ARGV[i + 1]) end
end
return created
"""

#: Lease up to the consumer's free capacity: due retries first, then new events.
#: KEYS: stream, meta, retry, att. ARGV: group, consumer, max in flight, now ms,
#: ordered ('1'/'0'), vis ms, dedup prefix, park ms.
#: Returns {deliveries, deduplicated, lost, more, next due, last id, free}; the
#: deliveries flat, five values each (id, attempt, envelope, original id or '',
#: key digest),
#: as nested replies cost the client more to parse than the scripts to build.
FETCH = (
    PRELUDE
    + """
local stream, meta, retry, att = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer, maxf, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ordered, vis, dp, park = ARGV[5] == '1', tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local gen = redis.call('HGET', meta, 'gen') or '0'
local cap = maxf - #redis.call('XPENDING', stream, group, '-', '+', maxf, consumer)
local out, dups, lost, more, retried, delivered = {}, 0, 0, 0, 0, 0

-- decide an entry just made pending for us: deliver it, or settle it here
local function admit(id, f, attempt)
  local only = field(f, 'g')
  if only and only ~= group then
    redis.call('XACK', stream, group, id)
    redis.call('HDEL', att, id)
    return
  end
  local k = field(f, 'k')
  if k then
    local st = redis.call('GET', dp .. k)
    if st and st == 'd:' .. gen then
      redis.call('XACK', stream, group, id)
      redis.call('HDEL', att, id)
      dups = dups + 1
      return
    end
    if st and string.sub(st, 1, 2) == 'p:' and string.sub(st, 3) ~= id then
      -- another event with this key is in processing: wait for its outcome,
      -- without spending an attempt, instead of running both at once
      redis.call('XACK', stream, group, id)
      if attempt > 1 then redis.call('HSET', att, id, attempt - 1) else redis.call('HDEL', att, id) end
      redis.call('ZADD', retry, now + park, id)
      return
    end
    redis.call('SET', dp .. k, 'p:' .. id, 'PX', vis)
  end
  if attempt > 1 then
    redis.call('HSET', att, id, attempt)
    retried = retried + 1
  end
  out[#out + 1] = id
  out[#out + 1] = attempt
  out[#out + 1] = field(f, 'e') or ''
  out[#out + 1] = field(f, 'eid') or ''
  out[#out + 1] = k or ''
  delivered = delivered + 1
  cap = cap - 1
end

if cap > 0 then
  local due = redis.call('ZRANGEBYSCORE', retry, '-inf', now, 'LIMIT', 0, cap)
  for _, id in ipairs(due) do
    redis.call('ZREM', retry, id)
    local f = entry(stream, id)
    if f then
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'FORCE', 'JUSTID')
      admit(id, f, tonumber(redis.call('HGET', att, id) or '0') + 1)
    else
      redis.call('HDEL', att, id)
      lost = lost + 1
    end
  end
end
if cap > 0 and not (ordered and redis.call('ZCARD', retry) > 0) then
  local want = cap
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', stream, '>')
  if r then
    local es = r[1][2]
    for _, e in ipairs(es) do admit(e[1], e[2], 1) end
    if #es == want then more = 1 end
  end
end
if delivered > 0 then
  redis.call('HINCRBY', meta, 'delivered', delivered)
  if retried > 0 then redis.call('HINCRBY', meta, 'retried', retried) end
end
if dups > 0 then redis.call('HINCRBY', meta, 'deduplicated', dups) end
local nd = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
local last = '0-0'
if delivered == 0 and more == 0 then
  local t = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #t > 0 then last = t[1][1] end
end
return {out, dups, lost, more, nd[2] or '-1', last, cap}
"""
)

#: Take over deliveries whose lease expired (idle longer than the visibility
#: timeout) with XAUTOCLAIM, to settle them as failed attempts.
#: KEYS: stream, meta, att. ARGV: group, consumer, vis ms, count.
#: Returns {entries, lost}, the entries flat: id, attempt, id, attempt...
RECLAIM = (
    PRELUDE
    + """
local stream, meta, att = KEYS[1], KEYS[2], KEYS[3]
local group, consumer = ARGV[1], ARGV[2]
local cursor = redis.call('HGET', meta, 'cursor') or '0-0'
local r = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], cursor, 'COUNT', ARGV[4], 'JUSTID')
redis.call('HSET', meta, 'cursor', r[1])
local out, lost = {}, 0
for _, id in ipairs(r[2]) do
  local f = entry(stream, id)
  if f then
    out[#out + 1] = id
    out[#out + 1] = attempt_of(att, id)
  else
    -- Redis 6.2 keeps trimmed entries pending: nothing is left to deliver
    redis.call('XACK', stream, group, id)
    redis.call('HDEL', att, id)
    lost = lost + 1
  end
end
if r[3] then
  -- Redis 7: trimmed entries were dropped from the pending list; forget their attempts
  for _, id in ipairs(r[3]) do
    redis.call('HDEL', att, id)
    lost = lost + 1
  end
end
return {out, lost}
"""
)

#: Acknowledge deliveries.
#: KEYS: stream, meta, att, retry, outbox. ARGV: group, done ttl ms, dedup
#: prefix, now ms, audit on, by, topic, then per delivery: id, consumer, attempt,
#: key digest (from the delivery id, so the event need not be read; '' = read it).
#: Returns one code per delivery: 'a' acked now, 'A' settled before, 'x' expired.
ACK = (
    PRELUDE
    + """
local stream, meta, att, retry, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, ttl, dp, now, on, by, topic = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local gen = redis.call('HGET', meta, 'gen') or '0'
local out, n = {}, 0
for i = 8, #ARGV, 4 do
  local id, consumer, attempt, k = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  if held(stream, group, att, id, consumer, attempt) then
    redis.call('XACK', stream, group, id)
    redis.call('HDEL', att, id)
    local f = nil
    if k == '' or on == '1' then
      f = entry(stream, id)
      k = f and field(f, 'k') or ''
    end
    if k ~= '' then redis.call('SET', dp .. k, 'd:' .. gen, 'PX', ttl) end
    audit(outbox, on, topic, group, consumer, id, f, attempt, 'acked', '', by, now)
    n = n + 1
    out[#out + 1] = 'a'
  elseif #redis.call('XPENDING', stream, group, id, id, 1) == 0 and not redis.call('ZSCORE', retry, id) then
    out[#out + 1] = 'A'
  else
    out[#out + 1] = 'x'
  end
end
if n > 0 then redis.call('HINCRBY', meta, 'acked', n) end
return out
"""
)

#: Settle failed deliveries: schedule a retry, or dead-letter.
#: KEYS: stream, meta, retry, att, dlq, dlq counts, outbox. ARGV: group, now ms,
#: dedup prefix, dlq max len, audit on, by, topic, then per delivery: id,
#: consumer, attempt, action ('r' retry, 'd' dead-letter), due ms, reason.
#: Returns per delivery {'r', due} | {'d', dead letter id} | {'x'} expired | {'l'} lost.
FAIL = (
    PRELUDE
    + """
local stream, meta, retry, att, dlq, dlqn, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local group, now, dp, dlqmax, on, by, topic = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local out, retried, dead = {}, 0, 0
for i = 8, #ARGV, 6 do
  local id, consumer, attempt, action, due, reason = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  if not held(stream, group, att, id, consumer, attempt) then
    out[#out + 1] = {'x'}
  else
    local f = entry(stream, id)
    redis.call('XACK', stream, group, id)
    release(dp, f, id)
    if not f then
      redis.call('HDEL', att, id)
      out[#out + 1] = {'l'}
    elseif action == 'r' then
      redis.call('HSET', att, id, attempt)
      redis.call('ZADD', retry, due, id)
      audit(outbox, on, topic, group, consumer, id, f, attempt, 'retried', reason, by, now)
      retried = retried + 1
      out[#out + 1] = {'r', due}
    else
      redis.call('HDEL', att, id)
      local dl = redis.call('XADD', dlq, '*', 'e', field(f, 'e'), 'eid', field(f, 'eid') or id,
        'group', group, 'reason', reason, 'attempts', attempt, 'consumer', consumer, 'time', now,
        't', field(f, 't') or '', 'k', field(f, 'k') or '', 'tp', field(f, 'tp') or '', 'a', field(f, 'a') or '')
      redis.call('HINCRBY', dlqn, group, 1)
      audit(outbox, on, topic, group, consumer, id, f, attempt, 'dead_lettered', reason, by, now)
      dead = dead + 1
      out[#out + 1] = {'d', dl}
    end
  end
end
if dead > 0 then
  redis.call('HINCRBY', meta, 'dead_lettered', dead)
  -- keep the queue bounded: the oldest dead letters go, and their counts with them
  local excess = redis.call('XLEN', dlq) - dlqmax
  if excess > 0 then
    for _, e in ipairs(redis.call('XRANGE', dlq, '-', '+', 'COUNT', excess)) do
      redis.call('HINCRBY', dlqn, field(e[2], 'group'), -1)
      redis.call('XDEL', dlq, e[1])
    end
  end
end
if retried > 0 then redis.call('HINCRBY', meta, 'retry_scheduled', retried) end
return out
"""
)

#: Extend leases (keep-alive): reset the idle time so the lease ends ``ext``
#: from now (at most the visibility timeout), and the processing lease with it.
#: KEYS: stream, meta, att. ARGV: group, dedup prefix, default vis ms, then per
#: delivery: id, consumer, attempt, ext ms ('0' = the visibility timeout), key digest.
#: Returns per delivery the granted ms, or -1 when the lease was lost.
EXTEND = (
    PRELUDE
    + """
local stream, meta, att = KEYS[1], KEYS[2], KEYS[3]
local group, dp = ARGV[1], ARGV[2]
local vis = tonumber(redis.call('HGET', meta, 'vis_ms') or ARGV[3])
local out = {}
for i = 4, #ARGV, 5 do
  local id, consumer, attempt, ext, k = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), ARGV[i + 4]
  if held(stream, group, att, id, consumer, attempt) then
    if ext <= 0 or ext > vis then ext = vis end
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'IDLE', vis - ext, 'JUSTID')
    if k == '' then
      local f = entry(stream, id)
      k = f and field(f, 'k') or ''
    end
    if k ~= '' and redis.call('GET', dp .. k) == 'p:' .. id then redis.call('PEXPIRE', dp .. k, ext) end
    out[#out + 1] = ext
  else
    out[#out + 1] = -1
  end
end
return out
"""
)

#: Schedule a range of events for redelivery to a group (replay without reset).
#: KEYS: stream, retry, att. ARGV: group, start, end, count, group's last
#: delivered id, base score, index offset.
#: Returns {events in range, scheduled, last id scanned or '', entries scanned}.
REPLAY_RANGE = (
    PRELUDE
    + """
local stream, retry, att = KEYS[1], KEYS[2], KEYS[3]
local group, last, base, offset = ARGV[1], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local es = redis.call('XRANGE', stream, ARGV[2], ARGV[3], 'COUNT', ARGV[4])
local n, scheduled = 0, 0
for i, e in ipairs(es) do
  local id = e[1]
  local only = field(e[2], 'g')
  if not only or only == group then
    n = n + 1
    -- events the group has not read yet, or holds right now, come anyway
    if cmp_id(id, last) <= 0 and #redis.call('XPENDING', stream, group, id, id, 1) == 0 then
      redis.call('HDEL', att, id)
      -- due in the past, spaced by a microsecond each, so they come in stream order
      redis.call('ZADD', retry, base + (offset + i) / 1000, id)
      scheduled = scheduled + 1
    end
  end
end
local lastid = ''
if #es > 0 then lastid = es[#es][1] end
return {n, scheduled, lastid, #es}
"""
)

#: Count events in a range, in chunks (lag before Redis 7, replay counts).
#: KEYS: stream. ARGV: start (may be exclusive '(id'), end.
COUNT_RANGE = """
local n, cur = 0, ARGV[1]
while true do
  local r = redis.call('XRANGE', KEYS[1], cur, ARGV[2], 'COUNT', 1000)
  n = n + #r
  if #r < 1000 then break end
  cur = '(' .. r[#r][1]
end
return n
"""

#: Send dead letters back to their group: each becomes a new entry of the
#: topic marked for that group only, with its original event id.
#: KEYS: stream, dlq, dlq counts. ARGV: maxlen, strict ('1': every id must
#: exist or nothing happens), then dead letter ids.
#: Returns {'ok', redriven} or {'missing', id}.
REDRIVE = (
    PRELUDE
    + """
local stream, dlq, dlqn = KEYS[1], KEYS[2], KEYS[3]
local maxlen = tonumber(ARGV[1])
if ARGV[2] == '1' then
  for i = 3, #ARGV do
    if not entry(dlq, ARGV[i]) then return {'missing', ARGV[i]} end
  end
end
local n = 0
for i = 3, #ARGV do
  local f = entry(dlq, ARGV[i])
  if f then
    local group = field(f, 'group')
    local args = {'XADD', stream}
    if maxlen > 0 then
      args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
    end
    for _, v in ipairs({'*', 'k', field(f, 'k'), 't', field(f, 't'), 'tp', field(f, 'tp'),
        'a', field(f, 'a'), 'eid', field(f, 'eid'), 'g', group, 'e', field(f, 'e')}) do
      args[#args + 1] = v
    end
    redis.call(unpack(args))
    redis.call('XDEL', dlq, ARGV[i])
    redis.call('HINCRBY', dlqn, group, -1)
    n = n + 1
  end
end
return {'ok', n}
"""
)

#: Delete dead letters. KEYS: dlq, dlq counts. ARGV: ids, or the single
#: argument '*' for all. Returns the number deleted.
PURGE = (
    PRELUDE
    + """
local dlq, dlqn = KEYS[1], KEYS[2]
if ARGV[1] == '*' and #ARGV == 1 then
  local n = redis.call('XLEN', dlq)
  redis.call('DEL', dlq, dlqn)
  return n
end
local n = 0
for i = 1, #ARGV do
  local f = entry(dlq, ARGV[i])
  if f then
    redis.call('XDEL', dlq, ARGV[i])
    redis.call('HINCRBY', dlqn, field(f, 'group'), -1)
    n = n + 1
  end
end
return n
"""
)
