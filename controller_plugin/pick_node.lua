-- Picks the node that runs one activation and queues the activation there, atomically:
-- no other pick can see the queue lengths between the choice and the LPUSH.
--
-- KEYS[1]  set of node ids (torpor:nodes)
-- ARGV[1]  prefix of a node's keys ("torpor:node:"), followed by the node id
-- ARGV[2]  JSON list of the model names the activation uses (may be empty)
-- ARGV[3]  the activation message, pushed as is onto <prefix><id>:queue
-- Returns the chosen node id, or nil when no node has its :alive key.
--
-- Score, best first: most of the wanted models resident on the node's devices
-- (<prefix><id>:device:<k>, field `resident`, k = 0, 1, ... while the hash exists), then the
-- fewest messages queued and in flight, then the smallest id.
local prefix = ARGV[1]
local wanted = cjson.decode(ARGV[2])

local function resident_hits(node)
  if #wanted == 0 then
    return 0
  end
  local present = {}
  local k = 0
  while redis.call('EXISTS', node .. ':device:' .. k) == 1 do
    local raw = redis.call('HGET', node .. ':device:' .. k, 'resident')
    if raw then
      local ok, names = pcall(cjson.decode, raw)
      if ok and type(names) == 'table' then
        for _, name in ipairs(names) do
          present[name] = true
        end
      end
    end
    k = k + 1
  end
  local hits = 0
  for _, name in ipairs(wanted) do
    if present[name] then
      hits = hits + 1
    end
  end
  return hits
end

local ids = redis.call('SMEMBERS', KEYS[1])
table.sort(ids)
local best, best_hits, best_load
for _, id in ipairs(ids) do
  local node = prefix .. id
  if redis.call('EXISTS', node .. ':alive') == 1 then
    local hits = resident_hits(node)
    local load = redis.call('LLEN', node .. ':queue') + redis.call('LLEN', node .. ':inflight')
    if best == nil or hits > best_hits or (hits == best_hits and load < best_load) then
      best, best_hits, best_load = id, hits, load
    end
  end
end
if best == nil then
  return nil
end
redis.call('LPUSH', prefix .. best .. ':queue', ARGV[3])
return best
