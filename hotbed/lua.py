"""Lua scripts for the multi-key atomic steps. Each header lists the keys it touches;
all keys of one script share a hash tag (see hotbed.keys), so they run on one shard.

Every script is a :class:`hotbed.batching.Script`, the one way hotbed runs Lua:
``await lua.RELEASE.run(redis, keys, args)``, or ``lua.RELEASE.call(keys, args)`` among
other commands in ``batching.for_client(redis).execute(...)``. The field names a
script writes into a sandbox record come from :mod:`hotbed.records` (as ARGV), so the
record's codec stays their one owner.
"""

from __future__ import annotations

from hotbed.batching import Script

# KEYS[1] = request or command stream
# ARGV[1] = backlog limit, ARGV[2] = encoded Envelope
# Returns the entry id, or false when the backlog is at its limit (client: Overloaded).
# Handled entries are deleted, so XLEN is exactly the unhandled backlog.
SUBMIT = Script("""
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
""")

# KEYS[1] = hotbed:{w:ID}:cmds, KEYS[2] = hotbed:{w:ID}:cap
# ARGV[1] = backlog limit, ARGV[2] = encoded Envelope
# SUBMIT for a worker's command stream: a worker the reaper has removed (no capacity
# hash) gets nothing, so a client never waits on a stream nobody reads.
# Returns the entry id, 0 when the backlog is full, -1 when the worker is gone.
SUBMIT_TO_WORKER = Script("""
if redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
return redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
""")

# KEYS[1] = hotbed:{w:ID}:cmds, KEYS[2] = hotbed:{w:ID}:cap,
# KEYS[3] = hotbed:{w:ID}:sandboxes, KEYS[4] = hotbed:{w:ID}:info,
# KEYS[5..] = hotbed:{w:ID}:cmds:TENANT, the tenants' command streams
# Removes a dead worker in one step: returns the sandbox ids it held and every command
# left in its streams as {stream, message} (to be answered WorkerLost), and deletes its keys, so no command
# can slip in between the answering and the deleting (SUBMIT_TO_WORKER sees no cap; a
# tenant's XADD NOMKSTREAM finds no stream).
DRAIN_WORKER = Script("""
local held = redis.call('HKEYS', KEYS[3])
local msgs = {}
for k = 1, #KEYS do
  if k == 1 or k > 4 then
    for _, e in ipairs(redis.call('XRANGE', KEYS[k], '-', '+')) do
      local fields = e[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'm' then table.insert(msgs, {KEYS[k], fields[i + 1]}) end
      end
    end
  end
end
redis.call('DEL', unpack(KEYS))
return {held, msgs}
""")

# KEYS[1] = hotbed:{w:ID}:cap, KEYS[2] = hotbed:{w:ID}:sandboxes, KEYS[3] = hotbed:{w:ID}:cmds,
# KEYS[4] (only with a lease) = hotbed:req:{RID}
# ARGV[1] = sandbox id, ARGV[2] = millicpu, ARGV[3] = memory MiB,
# ARGV[4] = encoded StartSandbox envelope, ARGV[5] = number of GPUs,
# ARGV[6] = the request's lease value ('' = none), ARGV[7] = its value once dispatched,
# ARGV[8] = how long that value is kept (ms), ARGV[9..] = GPU uuids eligible for this
# request, in preference order
# Reserves capacity on one worker and hands it the start command in one step, so a
# sandbox is never dispatched without capacity or reserved without dispatch. With a
# lease, it dispatches only while the request's key still holds that lease, and turns
# it into the dispatched value in the same step: a create is dispatched once, ever
# (scheduler.once). Only a standalone Redis gets KEYS[4] (on a cluster it sits on
# another shard; the placer writes it right after).
# Returns -1 if the lease is not held, false if the worker lacks capacity, else the
# list of GPU uuids assigned (empty for a CPU-only sandbox). Idempotent on the sandbox id.
RESERVE_DISPATCH = Script("""
if #KEYS > 3 and redis.call('GET', KEYS[4]) ~= ARGV[6] then
  return -1
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {}
end
local cpu = tonumber(redis.call('HGET', KEYS[1], 'cpu') or '-1')
local mem = tonumber(redis.call('HGET', KEYS[1], 'mem') or '-1')
local need_cpu, need_mem = tonumber(ARGV[2]), tonumber(ARGV[3])
if cpu < need_cpu or mem < need_mem then
  return false
end
local ngpu = tonumber(ARGV[5])
local got = {}
if ngpu > 0 then
  for i = 9, #ARGV do
    if redis.call('HGET', KEYS[1], 'gpu:' .. ARGV[i]) == '0' then
      table.insert(got, ARGV[i])
      if #got == ngpu then break end
    end
  end
  if #got < ngpu then
    return false
  end
  for _, u in ipairs(got) do
    redis.call('HSET', KEYS[1], 'gpu:' .. u, '1')
  end
end
redis.call('HINCRBY', KEYS[1], 'cpu', -need_cpu)
redis.call('HINCRBY', KEYS[1], 'mem', -need_mem)
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[2], ARGV[1], need_cpu .. ' ' .. need_mem .. ' ' .. table.concat(got, ','))
redis.call('XADD', KEYS[3], '*', 'm', ARGV[4])
if #KEYS > 3 then
  redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[8])
end
return got
""")

# KEYS[1] = hotbed:req:{RID}
# ARGV[1] = this attempt's lease value ("lease TOKEN"), ARGV[2] = lease (ms)
# Takes the lease on a create unless someone holds it or it was handled: returns 1 if
# the caller holds it now, else the key's value (another attempt's lease, or how the
# request was handled).
REQUEST_LEASE = Script("""
local cur = redis.call('GET', KEYS[1])
if cur then
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")

# KEYS[1] = hotbed:req:{RID}
# ARGV[1] = the caller's lease value, ARGV[2] = new value ('' = delete; the lease
# value itself = renew), ARGV[3] = its time to live (ms)
# Renews, hands back or settles a lease, only while the caller still holds it.
# Returns 1 if it did, 0 if the lease was not the caller's (any more).
REQUEST_SWAP = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
""")

# KEYS[1] = hotbed:{w:ID}:cap, KEYS[2] = hotbed:{w:ID}:sandboxes
# ARGV[1] = sandbox id
# Gives a sandbox's reservation back. Idempotent: only the first release of an id counts.
RELEASE = Script("""
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
local cpu, mem, gpus = string.match(held, '^(%S+) (%S+) ?(.*)$')
redis.call('HINCRBY', KEYS[1], 'cpu', tonumber(cpu))
redis.call('HINCRBY', KEYS[1], 'mem', tonumber(mem))
redis.call('HINCRBY', KEYS[1], 'n', -1)
for u in string.gmatch(gpus or '', '[^,]+') do
  redis.call('HSET', KEYS[1], 'gpu:' .. u, '0')
end
return 1
""")

# KEYS[1] = hotbed:{w:ID}:cap, KEYS[2] = hotbed:{w:ID}:sandboxes; ARGV[1] = sandbox id
# A paused sandbox holds no CPU or memory (its state is on disk): its reservation
# becomes "0 0 GPUS" (GPUs stay: a restore needs the same devices). Idempotent.
PARK = Script("""
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then
  return 0
end
local cpu, mem, gpus = string.match(held, '^(%S+) (%S+) ?(.*)$')
redis.call('HINCRBY', KEYS[1], 'cpu', tonumber(cpu))
redis.call('HINCRBY', KEYS[1], 'mem', tonumber(mem))
redis.call('HSET', KEYS[2], ARGV[1], '0 0 ' .. (gpus or ''))
return 1
""")

# KEYS as PARK; ARGV[1] = sandbox id, ARGV[2] = millicpu, ARGV[3] = MiB
# Takes a parked sandbox's CPU and memory back for resume: 1 if held afterwards, 0 if
# the worker has no room now, -1 if the sandbox holds no reservation here at all.
UNPARK = Script("""
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then
  return -1
end
local c, m, gpus = string.match(held, '^(%S+) (%S+) ?(.*)$')
if tonumber(c) ~= 0 or tonumber(m) ~= 0 then
  return 1
end
local need_cpu, need_mem = tonumber(ARGV[2]), tonumber(ARGV[3])
local cpu = tonumber(redis.call('HGET', KEYS[1], 'cpu') or '-1')
local mem = tonumber(redis.call('HGET', KEYS[1], 'mem') or '-1')
if cpu < need_cpu or mem < need_mem then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'cpu', -need_cpu)
redis.call('HINCRBY', KEYS[1], 'mem', -need_mem)
redis.call('HSET', KEYS[2], ARGV[1], need_cpu .. ' ' .. need_mem .. ' ' .. (gpus or ''))
return 1
""")

# KEYS[1] = hotbed:{w:ID}:cap; ARGV[1] = requested MiB the node's real memory can back
# Memory pressure: keeps the advertised free memory ('mem') at most ARGV[1] by moving the
# excess into 'withheld', and gives back what no longer needs withholding; atomic with
# reservations, so a concurrent RESERVE_DISPATCH is never lost. Returns MiB withheld.
# A cap hash that is gone (the worker was declared dead) is left alone.
WITHHOLD = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local before = tonumber(redis.call('HGET', KEYS[1], 'withheld') or '0')
local free = tonumber(redis.call('HGET', KEYS[1], 'mem') or '0') + before
local want = free - tonumber(ARGV[1])
if want < 0 then want = 0 end
redis.call('HSET', KEYS[1], 'mem', free - want, 'withheld', want)
return want
""")

# KEYS[1] = hotbed:{w:ID}:cap, KEYS[2] = hotbed:{w:ID}:sandboxes
# ARGV[1] = total millicpu, ARGV[2] = total MiB, ARGV[3..] = GPU uuids of the node
# (Re)computes a worker's free capacity from what it holds, atomically, so a restarted
# worker neither double-counts nor forgets the sandboxes it still runs.
REGISTER = Script("""
local cpu, mem = tonumber(ARGV[1]), tonumber(ARGV[2])
local taken = {}
local n = 0
local held = redis.call('HGETALL', KEYS[2])
for i = 2, #held, 2 do
  local c, m, gpus = string.match(held[i], '^(%S+) (%S+) ?(.*)$')
  cpu = cpu - tonumber(c)
  mem = mem - tonumber(m)
  n = n + 1
  for u in string.gmatch(gpus or '', '[^,]+') do taken[u] = true end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'cpu', cpu, 'mem', mem, 'n', n)
for i = 3, #ARGV do
  redis.call('HSET', KEYS[1], 'gpu:' .. ARGV[i], taken[ARGV[i]] and '1' or '0')
end
return n
""")

# KEYS[1] = hotbed:workers; ARGV[1] = worker id
# A worker's heartbeat, stamped with Redis's clock (never the worker's: a worker whose
# clock runs behind must not look dead to a reaper on another host). Returns it (ms).
HEARTBEAT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
""")

# KEYS[1] = hotbed:workers; ARGV[1] = heartbeat TTL (ms)
# The workers whose last heartbeat is older than the TTL, by Redis's clock (the one
# HEARTBEAT stamps with).
LAPSED_WORKERS = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
""")

# KEYS[1] = hotbed:{w:ID}:sandboxes; ARGV = sandbox id, reservation, ...
# A worker the reaper removed while it still ran sandboxes (a stalled loop, a Redis
# failover) takes their reservations back before REGISTER recomputes its capacity, so
# coming back destroys nothing. Returns how many it holds.
READOPT = Script("""
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return redis.call('HLEN', KEYS[1])
""")

# KEYS[1] = lock key; ARGV[1] = owner token, ARGV[2] = ttl ms
# Takes or renews a leader lock: true if the caller holds it afterwards.
LOCK = Script("""
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
""")

# KEYS[1] = hotbed:{pool:NAME}:ready, KEYS[2] = hotbed:{pool:NAME}:claims
# ARGV[1] = claim lease (ms)
# Optional, to flip the record in the same step: ARGV[2] = the head of a sandbox record's
# key ("hotbed:sb:{"), ARGV[3] = the names of the claim's clock fields (space-separated),
# ARGV[4..] = field, value, ... of the rest of the claim (hotbed.records.to_claimed).
# Takes one warm sandbox off a pool: no entry is ever handed to two callers (LPOP), and
# none is lost between this claim and the caller's reply: it sits in the claims zset
# under a lease until the caller finishes (ZREM) or the pool controller takes it back.
# With the claim given, the record flips pooled -> running here too, with the clock
# fields at Redis's time: the pool controller names a pooled sandbox so that its record
# shares the pool's slot (hotbed.keys), which is why this script may touch a key it was
# not given. An entry whose record is no longer pooled (its container died since it was
# listed) is dropped and the next one tried, up to 100 (the pool controller prunes the
# rest). Returns false when none is left, else {"SID WORKER", now_ms} (Redis clock).
POOL_CLAIM = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _ = 1, 100 do
  local item = redis.call('LPOP', KEYS[1])
  if not item then
    return false
  end
  local ok = #ARGV < 2
  if not ok then
    local record = ARGV[2] .. string.match(item, '^(%S+)') .. '}'
    if redis.call('HGET', record, 'state') == 'pooled' then
      local fields = {unpack(ARGV, 4)}
      local clock = string.format('%d.%03d', math.floor(now / 1000), now % 1000)
      for name in string.gmatch(ARGV[3], '%S+') do
        fields[#fields + 1] = name
        fields[#fields + 1] = clock
      end
      redis.call('HSET', record, unpack(fields))
      ok = true
    end
  end
  if ok then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), item)
    return {item, tostring(now)}
  end
end
return false
""")


# KEYS[1] = hotbed:sb:{SID}
# ARGV = field, value, ... of the claim (hotbed.records.claimed: state running, path
# warm, the claim's clock, timeout, idle timeout, tags and claimer)
# Second step of a warm claim that runs something between the take and the flip (a
# tenant's quota; POOL_CLAIM flips the record itself otherwise): the record flips
# pooled -> running only if it is still pooled (its container may have died since it
# was listed). Returns 1 or 0.
CLAIM_RECORD = Script("""
if redis.call('HGET', KEYS[1], 'state') ~= 'pooled' then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
""")

# KEYS[1] = hotbed:{pool:NAME}:ready, KEYS[2] = hotbed:{pool:NAME}:stale
# A template was rebuilt: every ready entry moves to the stale list in one step (the
# pool controller ends them), so no claim after the rebuild gets the old set-up.
# Returns how many moved.
POOL_RETIRE = Script("""
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do
  n = n + 1
end
return n
""")

# KEYS[1] = hotbed:{pool:NAME}:ready, KEYS[2] = hotbed:{pool:NAME}:warming,
# KEYS[3] = hotbed:{pool:NAME}:conf
# ARGV[1] = "SID WORKER"
# A worker made a pool sandbox ready: it joins the ready list unless the pool was
# deleted meanwhile. Returns 1 if listed, 0 if the caller should end the sandbox.
POOL_PUT = Script("""
local sid = string.match(ARGV[1], '^(%S+)')
redis.call('ZREM', KEYS[2], sid)
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[1])
return 1
""")

# KEYS[1] = hotbed:tpl:{NAME}
# ARGV[1] = worker id
# A worker now holds template NAME's snapshot locally: adds it to the record's
# ``holders`` (a sorted JSON list) in one step, so two workers finishing a copy at
# once both stay listed. Returns 1 if added, 0 if it was listed already.
ADD_HOLDER = Script("""
local raw = redis.call('HGET', KEYS[1], 'holders')
local holders = {}
if raw and raw ~= '' then
  holders = cjson.decode(raw)
end
for _, h in ipairs(holders) do
  if h == ARGV[1] then return 0 end
end
table.insert(holders, ARGV[1])
table.sort(holders)
redis.call('HSET', KEYS[1], 'holders', cjson.encode(holders))
return 1
""")

# KEYS[1] = hotbed:{t:T}:quota, KEYS[2] = hotbed:{t:T}:held,
# KEYS[3] = hotbed:{t:T}:usage, KEYS[4] = hotbed:{t:T}:rate
# ARGV[1] = sandbox id, ARGV[2] = millicpu, ARGV[3] = MiB, ARGV[4] = GPUs
# Takes a create's share of tenant T's quota, or refuses it: at most ``sandboxes``
# held, ``millicpu``/``memory_mb``/``gpus`` summed over them, and ``creates_per_s``
# (a token bucket holding one second's worth, on Redis TIME). A limit that is absent
# or 0 is no limit. Idempotent on the sandbox id (a redelivered create takes nothing).
# Returns 'ok', or the name of the limit the create would pass.
QUOTA_TAKE = Script("""
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return 'ok'
end
local q = {}
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do q[raw[i]] = tonumber(raw[i + 1]) or 0 end
local u = {n = 0, cpu = 0, mem = 0, gpu = 0}
raw = redis.call('HGETALL', KEYS[3])
for i = 1, #raw, 2 do u[raw[i]] = tonumber(raw[i + 1]) or 0 end
local cpu, mem, gpu = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function over(limit, value)
  return (q[limit] or 0) > 0 and value > q[limit]
end
if over('sandboxes', u.n + 1) then return 'sandboxes' end
if over('millicpu', u.cpu + cpu) then return 'cpu' end
if over('memory_mb', u.mem + mem) then return 'memory_mb' end
if over('gpus', u.gpu + gpu) then return 'gpus' end
local rate = q['creates_per_s'] or 0
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local burst = math.max(1, rate)
  local tokens = tonumber(redis.call('HGET', KEYS[4], 'tokens') or burst)
  local at = tonumber(redis.call('HGET', KEYS[4], 'at') or now)
  tokens = math.min(burst, tokens + (now - at) * rate / 1000)
  if tokens < 1 then
    redis.call('HSET', KEYS[4], 'tokens', tostring(tokens), 'at', now)
    return 'creates_per_s'
  end
  redis.call('HSET', KEYS[4], 'tokens', tostring(tokens - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[4], 60000)
end
redis.call('HSET', KEYS[2], ARGV[1], cpu .. ' ' .. mem .. ' ' .. gpu)
redis.call('HINCRBY', KEYS[3], 'n', 1)
redis.call('HINCRBY', KEYS[3], 'cpu', cpu)
redis.call('HINCRBY', KEYS[3], 'mem', mem)
redis.call('HINCRBY', KEYS[3], 'gpu', gpu)
return 'ok'
""")

# KEYS[1] = hotbed:{t:T}:held, KEYS[2] = hotbed:{t:T}:usage; ARGV[1] = sandbox id
# Gives a sandbox's share of its tenant's quota back. Idempotent: 1 the first time, 0 after.
QUOTA_GIVE = Script("""
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
local cpu, mem, gpu = string.match(held, '^(%S+) (%S+) (%S+)$')
redis.call('HINCRBY', KEYS[2], 'n', -1)
redis.call('HINCRBY', KEYS[2], 'cpu', 0 - tonumber(cpu))
redis.call('HINCRBY', KEYS[2], 'mem', 0 - tonumber(mem))
redis.call('HINCRBY', KEYS[2], 'gpu', 0 - tonumber(gpu))
return 1
""")
