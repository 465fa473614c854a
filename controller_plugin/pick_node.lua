-- Picks the node and device that run one activation, books a slot on that device and
-- queues the activation there, atomically: no other pick sees the cluster between this
-- one's reads and its writes. Runs after bookings.lua (drop_booking).
--
-- KEYS[1]   set of node ids (torpor:nodes)
-- KEYS[2]   optional: the list the message moves from (a node's queue or in-flight list);
--           with it, ARGV[11] is the raw element removed from there when, and only when, the
--           message is queued (a re-dispatch: never on two nodes at once, never on none);
--           when the element is no longer there (another dispatcher moved it), nothing is
--           queued or booked and 0 is returned (expired bookings may have been swept)
-- ARGV[1]   prefix of a node's keys ("torpor:node:"), followed by the node id
-- ARGV[2]   now, epoch ms: bookings whose expiry is not after it are dropped first
-- ARGV[3]   expiry of this activation's booking, epoch ms
-- ARGV[4]   the activation message as a JSON object without its "gpu" and "booking" fields
-- ARGV[5]   "1" when the message had a "gpu" field (kept, as null, where no device is proposed)
-- ARGV[6]   "<activationId>:<attempt>", the booking's name
-- ARGV[7]   host->device bandwidth of one link, bytes/s
-- ARGV[8]   pipelined-swap tail (share of exec time after the last byte lands)
-- ARGV[9]   slots of a device whose hash has no `slots` field (0: unlimited)
-- ARGV[10]  ms of work per request in a device's published `queue`
-- ARGV[11], [12], [13], then per further model (from ARGV[12] with KEYS[2]): the model
--           name as a JSON string (as the GPU server writes it in `resident`), its weight
--           bytes, its resident exec ms
--
-- Returns {node id, device (-1: none proposed), predicted ms, models resident there, booking
-- member ("" when none)}, nil when no live node has a device with a free slot, or 0 (with
-- KEYS[2]) when the message was moved already.
--
-- Candidates are the devices <node>:device:<k> (k = 0, 1, ... while the hash has `healthy`)
-- of nodes holding <node>:alive, healthy and with a free slot (booked < slots). Each
-- is scored as controller_plugin/predictor.py predicts a completion:
--   wait     = max(booked_ms, queue * ARGV[10])       (work ahead of it on the device)
--   service  = sum over models of exec                            (resident)
--                              or max(transfer, exec) + tail * exec  (copied from host)
--   transfer = bytes * (copies + 1) / bandwidth * 1000  (link shared with the copies booked there)
-- lowest wait + service first, then most models resident, then least load (booked +
-- queue), then smallest node id, then smallest device index. The message is pushed with
-- "gpu" (the proposed device) and "booking" (the member to release) prepended.
--
-- A live node without published devices is one device with nothing resident, no booking
-- and a wait of (queued + in-flight messages) * ARGV[10]. An activation naming no model
-- needs no device: it goes to the live node with the fewest queued + in-flight messages,
-- then the smallest id, without a booking.
local prefix = ARGV[1]
local now = tonumber(ARGV[2])
local expires = tonumber(ARGV[3])
local body = ARGV[4]
local had_gpu = ARGV[5] == '1'
local bandwidth = tonumber(ARGV[7])
local tail = tonumber(ARGV[8])
local default_slots = tonumber(ARGV[9])
local queued_ms = tonumber(ARGV[10])
local moved_from, first_model = nil, 11
if #KEYS >= 2 then
  moved_from, first_model = ARGV[11], 12
end
local needles, sizes, execs = {}, {}, {}
for i = first_model, #ARGV - 2, 3 do
  needles[#needles + 1] = ARGV[i]
  sizes[#sizes + 1] = tonumber(ARGV[i + 1])
  execs[#execs + 1] = tonumber(ARGV[i + 2])
end
local nmodels = #needles
local exec_sum = 0
for i = 1, nmodels do
  exec_sum = exec_sum + execs[i]
end

-- Whether the JSON list `raw` holds the string `needle` (a complete JSON string). A match
-- counts only at an element's opening quote, i.e. after '[' or a separator; a quote
-- inside an element is escaped, so it follows a backslash.
local function holds(raw, needle)
  local from = 1
  while true do
    local at = string.find(raw, needle, from, true)
    if not at then
      return false
    end
    local before = string.sub(raw, at - 1, at - 1)
    if before == '[' or before == ' ' or before == ',' then
      return true
    end
    from = at + 1
  end
end

-- Service of this activation on a device: ms, models resident, models copied from host.
local function service(resident, copies)
  local total, hits, copied = 0, 0, 0
  for i = 1, nmodels do
    local exec = execs[i]
    if resident and holds(resident, needles[i]) then
      total = total + exec
      hits = hits + 1
    else
      local transfer = sizes[i] * (copies + 1) / bandwidth * 1000.0
      if transfer <= 0 then
        total = total + exec
      else
        total = total + math.max(transfer, exec) + tail * exec
      end
      copied = copied + 1
    end
  end
  return total, hits, copied
end

local best = nil

local function consider(ms, hits, load, id, k, svc, copied)
  local b = best
  if b == nil or ms < b.ms or (ms == b.ms and (hits > b.hits or (hits == b.hits and (load < b.load
      or (load == b.load and (id < b.id or (id == b.id and k < b.k))))))) then
    best = {ms = ms, hits = hits, load = load, id = id, k = k, svc = svc, copied = copied}
  end
end

local function sweep(node)
  local expired = redis.call('ZRANGEBYSCORE', node .. ':booked', '-inf', now)
  for i = 1, #expired do
    drop_booking(node, expired[i])
  end
end

-- Pass 1 reads every candidate's wait and slots, not its resident list (the bulk of the
-- bytes): wait + exec is a lower bound of its score, wait + every model copied an upper one.
local candidates = {}
local least_upper = math.huge
local ids = redis.call('SMEMBERS', KEYS[1])
local alive_keys = {}
for i, id in ipairs(ids) do
  alive_keys[i] = prefix .. id .. ':alive'
end
local alive = #ids > 0 and redis.call('MGET', unpack(alive_keys)) or {}
for i, id in ipairs(ids) do
  local node = prefix .. id
  if alive[i] then
    if nmodels == 0 then
      consider(0, 0, redis.call('LLEN', node .. ':queue') + redis.call('LLEN', node .. ':inflight'), id, -1, 0, 0)
    else
      sweep(node)
      local k = 0
      while true do
        local f = redis.call('HMGET', node .. ':device:' .. k, 'healthy', 'queue', 'slots', 'booked', 'booked_ms', 'copies')
        if not f[1] then
          break
        end
        local booked = tonumber(f[4]) or 0
        local slots = tonumber(f[3]) or default_slots
        if f[1] ~= '0' and (slots <= 0 or booked < slots) then
          local queue = tonumber(f[2]) or 0
          local wait = math.max(tonumber(f[5]) or 0, queue * queued_ms)
          local copies = tonumber(f[6]) or 0
          local upper = wait + service(false, copies)
          least_upper = math.min(least_upper, upper)
          candidates[#candidates + 1] = {id = id, node = node, k = k, wait = wait, copies = copies,
                                         load = booked + queue, lower = wait + exec_sum}
        end
        k = k + 1
      end
      if k == 0 then
        local messages = redis.call('LLEN', node .. ':queue') + redis.call('LLEN', node .. ':inflight')
        local svc = service(false, 0)
        least_upper = math.min(least_upper, messages * queued_ms + svc)
        consider(messages * queued_ms + svc, 0, messages, id, -1, svc, 0)
      end
    end
  end
end

-- Pass 2 scores exactly the candidates that can still win or tie (lower bound not above
-- the best upper bound, nor above the best score found so far).
for _, c in ipairs(candidates) do
  if c.lower <= least_upper and (best == nil or c.lower <= best.ms) then
    local resident = redis.call('HGET', c.node .. ':device:' .. c.k, 'resident')
    local svc, hits, copied = service(resident, c.copies)
    consider(c.wait + svc, hits, c.load, c.id, c.k, svc, copied)
  end
end

if best == nil then
  return nil
end
if moved_from and redis.call('LREM', KEYS[2], 1, moved_from) == 0 then
  return 0
end

local function with_fields(fields)
  if body == '{}' then
    return '{' .. fields .. '}'
  end
  return '{' .. fields .. ',' .. string.sub(body, 2)
end

local node = prefix .. best.id
local member = ''
local message = body
if best.k >= 0 then
  local ms = string.format('%.3f', best.svc)
  member = best.k .. '|' .. ARGV[6] .. '|' .. ms .. '|' .. best.copied
  if redis.call('ZADD', node .. ':booked', expires, member) == 1 then
    local device = node .. ':device:' .. best.k
    redis.call('HINCRBY', device, 'booked', 1)
    redis.call('HINCRBYFLOAT', device, 'booked_ms', ms)
    redis.call('HINCRBY', device, 'copies', best.copied)
  end
  message = with_fields('"gpu":' .. best.k .. ',"booking":' .. cjson.encode(member))
elseif had_gpu then
  message = with_fields('"gpu":null')
end
redis.call('LPUSH', node .. ':queue', message)
return {best.id, tostring(best.k), string.format('%.6f', best.ms), tostring(best.hits), member}
