-- Device bookings, shared by pick_node.lua and the release script of routing.py (each is
-- this file followed by its own body).
--
-- A booking is the slot one dispatched activation holds on the device the controller
-- proposed for it, from the dispatch until the invoker releases it (activation done) or
-- it expires. Per node:
--   <node>:booked          sorted set, one member per booking, score = expiry (epoch ms);
--                          member = "<device>|<activationId>:<attempt>|<service ms>|<host copies>"
--   <node>:device:<k>      fields kept in step with it: booked (count), booked_ms (sum of
--                          the bookings' predicted service, ms), copies (host copies they make)

-- Removes one booking and takes it off its device's counters; 1 if it was there, else 0.
-- Only members this script wrote are ever parsed: ZREM fails for anything else.
local function drop_booking(node, member)
  if redis.call('ZREM', node .. ':booked', member) == 0 then
    return 0
  end
  local k = string.match(member, '^(%d+)|')
  local ms, copies = string.match(member, '|([^|]+)|(%d+)$')
  local device = node .. ':device:' .. k
  if redis.call('HINCRBY', device, 'booked', -1) <= 0 then
    -- an exact zero, whatever float rounding the sums gathered
    redis.call('HSET', device, 'booked', 0, 'booked_ms', 0, 'copies', 0)
  else
    redis.call('HINCRBYFLOAT', device, 'booked_ms', '-' .. ms)
    if copies ~= '0' then
      redis.call('HINCRBY', device, 'copies', '-' .. copies)
    end
  end
  return 1
end
