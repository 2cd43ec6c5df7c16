-- A client's batch of new jobs, each with its first message (broker/outbox.py, broker/client.py):
-- the transactional outbox in one script, so the conflict check and every write are atomic with
-- no WATCH and one round trip per batch (see broker/keys.py for the layout).
--
-- enqueue(keys=[namespace], args=[queue, created_at, wake_cap, trace_maxlen, job...])
--
--   job            "job_id\npayload_hash\nrecord\nevent\nmessage_id\nmessage": one argument per job
--                  (packing six per job cost the client more than splitting costs here; none of
--                  the parts holds a newline: ids are hex, the rest is JSON, which escapes them)
--   payload_hash   "" when the sender gave no key (a fresh key cannot conflict); else what the key
--                  is bound to. Checked for every item in order: a stored record bound to
--                  another hash, or (no record yet) an earlier item of the batch with the same job
--                  and another hash, is a conflict: the script writes nothing and returns the
--                  1-based index of that item. Records without a payload_hash bind nothing.
--   record         the job record, created only where none exists ({ns}:job:{id} SET NX, indexed
--                  in {ns}:jobs): re-sending a key never resets its job
--   event          the ``enqueued`` trace event, added to {ns}:trace:{id} (capped near trace_maxlen)
--   message        dramatiq's encoded message, stored under message_id in {ns}:{queue}.msgs and
--                  pushed on its lane of the queue (lanes_lib.lua, run before this: {ns}:{queue} for
--                  a normal message without a flow key); then up to wake_cap wake-up tokens on
--                  {ns}:{queue}.wake
--
-- Returns 0 when every item was written.

local ns = KEYS[1]
local queue, created_at, wake_cap, trace_maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local first = 5
local n = #ARGV - first + 1
if n < 1 then return 0 end

local find, sub = string.find, string.sub
local ids, hashes, records, events, message_ids, messages = {}, {}, {}, {}, {}, {}
for i = 1, n do
    local job = ARGV[first + i - 1]
    local a = find(job, "\n", 1, true)
    local b = find(job, "\n", a + 1, true)
    local c = find(job, "\n", b + 1, true)
    local d = find(job, "\n", c + 1, true)
    local e = find(job, "\n", d + 1, true)
    ids[i], hashes[i], records[i] = sub(job, 1, a - 1), sub(job, a + 1, b - 1), sub(job, b + 1, c - 1)
    events[i], message_ids[i], messages[i] = sub(job, c + 1, d - 1), sub(job, d + 1, e - 1), sub(job, e + 1)
end

-- The records first, in order, each a SET NX: a fresh key (the usual case) costs that one command,
-- and only a record that was there already is read for its payload_hash. A conflict found then
-- deletes the records this batch created (the script is atomic: nobody saw them), so nothing is
-- written, as when every key was checked before the first write.
local bound, created, made = {}, {}, {}
for i = 1, n do
    local job_id, hash = ids[i], hashes[i]
    local key = ns .. ":job:" .. job_id
    if redis.call("set", key, records[i], "nx") then
        created[#created + 1] = key
        made[job_id] = true
        if hash ~= "" then bound[job_id] = hash end
    elseif hash ~= "" then
        local stored
        if made[job_id] then
            stored = bound[job_id]  -- no record before this batch: an earlier item's key binds it
        else
            -- A key of another type, a record that is no JSON or a JSON scalar: the call fails, with
            -- nothing written (every error raised once a record was created must go through here).
            local ok, raw = pcall(redis.call, "get", key)
            local decoded = raw
            if ok then ok, decoded = pcall(function() return cjson.decode(raw)["payload_hash"] end) end
            if not ok then
                for c = 1, #created do redis.call("del", created[c]) end
                error(decoded)
            end
            stored = decoded
            if stored == cjson.null then stored = nil end
        end
        if bound[job_id] == nil then bound[job_id] = hash end
        if stored ~= nil and stored ~= hash then
            for c = 1, #created do redis.call("del", created[c]) end
            return i
        end
    end
end

-- One command per job for its trace; the index, bodies and ids in commands of up to `slice` jobs
-- each (Lua's stack bounds how many arguments one call may take).
local jobs, msgs, ready = ns .. ":jobs", ns .. ":" .. queue .. ".msgs", ns .. ":" .. queue
local slice = 1000
for from = 1, n, slice do
    local index, bodies, pushed = {}, {}, {}
    for i = from, math.min(n, from + slice - 1) do
        local job_id = ids[i]
        redis.call("xadd", ns .. ":trace:" .. job_id, "maxlen", "~", trace_maxlen, "*", "e", events[i])
        index[#index + 1] = created_at
        index[#index + 1] = job_id
        bodies[#bodies + 1] = message_ids[i]
        bodies[#bodies + 1] = messages[i]
    end
    redis.call("zadd", jobs, "nx", unpack(index))
    redis.call("hset", msgs, unpack(bodies))
    -- Normal messages without a flow key go on the queue's list in one command; the others each
    -- to its lane (lanes_lib.lua).
    for i = from, math.min(n, from + slice - 1) do
        local level, flow = lane_of(messages[i])
        if level == "normal" and not flow then
            pushed[#pushed + 1] = message_ids[i]
        else
            lane_push(ready, message_ids[i], messages[i], false)
        end
    end
    if #pushed > 0 then redis.call("rpush", ready, unpack(pushed)) end
end

local wake = ns .. ":" .. queue .. ".wake"
local tokens = {}
for t = 1, math.min(n, wake_cap) do tokens[t] = 1 end
if redis.call("rpush", wake, unpack(tokens)) > wake_cap then redis.call("ltrim", wake, -wake_cap, -1) end
return 0
