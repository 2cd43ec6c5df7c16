-- A client's batch of new jobs, each with its first message (broker/outbox.py, broker/client.py):
-- the transactional outbox in one script, so the conflict check and every write are atomic with
-- no WATCH and one round trip per batch (see broker/keys.py for the layout).
--
-- prefix: the namespace's key prefix, "{ns}" (broker/keys.py); every key this script touches is built from it.
--
-- enqueue(keys=[prefix], args=[queue, created_at, wake_cap, trace_maxlen, plain,
--                                 job_id, payload_hash, record, event, message_id, message, ...])
--
--   plain          "1" when every message of the batch is of normal priority without a flow key:
--                  all go on the queue's list, none is read for its lane; else "" (lane_of reads
--                  each message's lane)
--   then six arguments per job (one argument per part, so nothing is split here):
--   payload_hash   "" when the sender gave no key (a fresh key cannot conflict); else what the key
--                  is bound to. Checked for every item in order: a stored record bound to
--                  another hash, or (no record yet) an earlier item of the batch with the same job
--                  and another hash, is a conflict: the script writes nothing and returns the
--                  1-based index of that item. Records without a payload_hash bind nothing.
--   record         the job record, created only where none exists ({ns}:job:{id} SET NX, indexed
--                  in {ns}:jobs): re-sending a key never resets its job
--   event          the ``enqueued`` trace event, added to {ns}:trace:{id} (capped near trace_maxlen)
--   message        dramatiq's encoded message, stored under message_id in {ns}:{queue}.msgs and
--                  pushed on its lane of the queue (lanes_lib.lua, defined before this in a function,
--                  lanes_lib(), called for a batch that is not plain: {ns}:{queue} for a normal
--                  message without a flow key); then wake-up tokens on {ns}:{queue}.wake, one a
--                  message, as many as keep it within wake_cap: its length read first (LLEN), so a
--                  full list (consumers busy, none waiting for a token) costs that one command, where
--                  pushing and trimming back (RPUSH, LTRIM) cost two
--
-- Returns 0 when every item was written, or when this same call had written them before: a call
-- the client sent again after its answer was lost with its connection (MESH_REDIS_RETRIES) finds a
-- message of its own stored (HEXISTS, read only for a key whose record exists) and writes nothing
-- more, so a retried send never pushes its message, its trace event or its wake-up token twice.

local ns = KEYS[1]
local queue, created_at, wake_cap, trace_maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local plain = ARGV[5] == "1"
local lane_of, lane_push -- lanes_lib.lua's, defined only when a message is not plain
local first, width = 6, 6
local n = (#ARGV - first + 1) / width
if n < 1 then return 0 end

-- One job (a send()): the same check and writes as the batch's below, without its tables.
if n == 1 then
    local job_id, hash, message_id, message = ARGV[first], ARGV[first + 1], ARGV[first + 4], ARGV[first + 5]
    local key = ns .. ":job:" .. job_id
    local ready = ns .. ":" .. queue
    local taken = not redis.call("set", key, ARGV[first + 2], "nx")
    -- This very call, run before (its answer lost with its connection, so the client sent it again):
    -- its message is stored already (message ids are never reused). Nothing more to write.
    if taken and redis.call("hexists", ready .. ".msgs", message_id) == 1 then return 0 end
    if taken and hash ~= "" then
        local ok, raw = pcall(redis.call, "get", key)
        local stored = raw
        if ok then ok, stored = pcall(function() return cjson.decode(raw)["payload_hash"] end) end
        if not ok then error(stored) end
        if stored ~= nil and stored ~= cjson.null and stored ~= hash then return 1 end
    end
    redis.call("xadd", ns .. ":trace:" .. job_id, "maxlen", "~", trace_maxlen, "*", "e", ARGV[first + 3])
    redis.call("zadd", ns .. ":jobs", "nx", created_at, job_id)
    redis.call("hset", ready .. ".msgs", message_id, message)
    if plain then
        redis.call("rpush", ready, message_id)
    else
        lane_of, lane_push = lanes_lib()
        lane_push(ready, message_id, message, false)
    end
    local wake = ready .. ".wake"
    if redis.call("llen", wake) < wake_cap then redis.call("rpush", wake, 1) end
    return 0
end

-- The records first, in order, each a SET NX: a fresh key (the usual case) costs that one command,
-- and only a record that was there already is read for its payload_hash. A conflict found then
-- deletes the records this batch created (the script is atomic: nobody saw them), so nothing is
-- written, as when every key was checked before the first write.
local bound, created, made = {}, {}, {}
local msgs = ns .. ":" .. queue .. ".msgs"
for i = 1, n do
    local at = first + (i - 1) * width
    local job_id, hash = ARGV[at], ARGV[at + 1]
    local key = ns .. ":job:" .. job_id
    if redis.call("set", key, ARGV[at + 2], "nx") then
        created[#created + 1] = key
        made[job_id] = true
        if hash ~= "" then bound[job_id] = hash end
    elseif not made[job_id] and redis.call("hexists", msgs, ARGV[at + 4]) == 1 then
        -- This very call, run before (its answer lost with its connection, so the client sent it
        -- again): a message of it is stored already (message ids are never reused), so all of it
        -- was written (a script is atomic). Nothing more to write.
        for c = 1, #created do redis.call("del", created[c]) end
        return 0
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
local jobs, ready = ns .. ":jobs", ns .. ":" .. queue
local slice = 1000
for from = 1, n, slice do
    local index, bodies, pushed = {}, {}, {}
    for i = from, math.min(n, from + slice - 1) do
        local at = first + (i - 1) * width
        local job_id = ARGV[at]
        redis.call("xadd", ns .. ":trace:" .. job_id, "maxlen", "~", trace_maxlen, "*", "e", ARGV[at + 3])
        index[#index + 1] = created_at
        index[#index + 1] = job_id
        bodies[#bodies + 1] = ARGV[at + 4]
        bodies[#bodies + 1] = ARGV[at + 5]
    end
    redis.call("zadd", jobs, "nx", unpack(index))
    redis.call("hset", msgs, unpack(bodies))
    -- Normal messages without a flow key go on the queue's list in one command; the others each
    -- to its lane (lanes_lib.lua).
    for i = from, math.min(n, from + slice - 1) do
        local at = first + (i - 1) * width
        if plain then
            pushed[#pushed + 1] = ARGV[at + 4]
        else
            if not lane_of then lane_of, lane_push = lanes_lib() end
            local level, flow = lane_of(ARGV[at + 5])
            if level == "normal" and not flow then
                pushed[#pushed + 1] = ARGV[at + 4]
            else
                lane_push(ready, ARGV[at + 4], ARGV[at + 5], false)
            end
        end
    end
    if #pushed > 0 then redis.call("rpush", ready, unpack(pushed)) end
end

local wake = ns .. ":" .. queue .. ".wake"
local tokens = {}
for t = 1, math.min(n, wake_cap - redis.call("llen", wake)) do tokens[t] = 1 end
if #tokens > 0 then redis.call("rpush", wake, unpack(tokens)) end
return 0
