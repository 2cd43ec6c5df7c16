-- A client's batch of new jobs, each with its first message (broker/outbox.py, broker/client.py):
-- the transactional outbox in one script, so the conflict check and every write are atomic with
-- no WATCH and one round trip per batch (see broker/keys.py for the layout).
--
-- enqueue(keys=[namespace], args=[queue, created_at, wake_cap, trace_maxlen,
--                                 (job_id, payload_hash, record, event, message_id, message)...])
--
--   payload_hash   "" when the sender gave no key (a fresh key cannot conflict); else what the key
--                  is bound to. Checked first, for every item in order: a stored record bound to
--                  another hash, or (no record yet) an earlier item of the batch with the same job
--                  and another hash, is a conflict: the script writes nothing and returns the
--                  1-based index of that item. Records without a payload_hash bind nothing.
--   record         the job record, created only where none exists ({ns}:job:{id} SET NX, indexed
--                  in {ns}:jobs): re-sending a key never resets its job
--   event          the ``enqueued`` trace event, added to {ns}:trace:{id} (capped near trace_maxlen)
--   message        dramatiq's encoded message, stored under message_id in {ns}:{queue}.msgs and
--                  pushed on {ns}:{queue}; then up to wake_cap wake-up tokens on {ns}:{queue}.wake
--
-- Returns 0 when every item was written.

local ns = KEYS[1]
local queue, created_at, wake_cap, trace_maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local first, width = 5, 6
local n = (#ARGV - first + 1) / width

local bound = {}
for i = 0, n - 1 do
    local at = first + i * width
    local job_id, hash = ARGV[at], ARGV[at + 1]
    if hash ~= "" then
        local raw = redis.call("get", ns .. ":job:" .. job_id)
        local stored
        if raw then
            stored = cjson.decode(raw)["payload_hash"]
            if stored == cjson.null then stored = nil end
        else
            stored = bound[job_id]
        end
        if bound[job_id] == nil then bound[job_id] = hash end
        if stored ~= nil and stored ~= hash then return i + 1 end
    end
end

local jobs, msgs, ready = ns .. ":jobs", ns .. ":" .. queue .. ".msgs", ns .. ":" .. queue
for i = 0, n - 1 do
    local at = first + i * width
    local job_id = ARGV[at]
    redis.call("set", ns .. ":job:" .. job_id, ARGV[at + 2], "nx")
    redis.call("zadd", jobs, "nx", created_at, job_id)
    redis.call("xadd", ns .. ":trace:" .. job_id, "maxlen", "~", trace_maxlen, "*", "e", ARGV[at + 3])
    redis.call("hset", msgs, ARGV[at + 4], ARGV[at + 5])
    redis.call("rpush", ready, ARGV[at + 4])
end

local wake = ns .. ":" .. queue .. ".wake"
local tokens = {}
for t = 1, math.min(n, wake_cap) do tokens[t] = 1 end
redis.call("rpush", wake, unpack(tokens))
redis.call("ltrim", wake, -wake_cap, -1)
return 0
