-- A pipeline run's start (MeshClient.run, broker/pipelines.py StartRun): its spec's registration,
-- its job record and the root steps' messages in one script, so the key's conflict check, the
-- replace=False check and every write are atomic with no WATCH and one round trip (see
-- broker/keys.py for the layout). lanes_lib.lua is run before this.
--
-- prefix: the namespace's key prefix, "{ns}" (broker/keys.py); every key this script touches is built from it.
-- On a shard of its own (MESH_SHARD: the job's keys "{ns:N}", the registered pipelines "{ns}"), the
-- registration is one call (prefix "{ns}", job_id "": answers 1, "spec" or "pipeline:" .. digest),
-- then the job's (its prefix, name ""): the registry and the job are two slots on a Redis Cluster.
--
-- run(keys=[prefix], args=[job_id, payload_hash, record, created_at, trace_maxlen, wake_cap,
--                             name, digest, replace, canonical, n_events, (job_id, event)..., (queue, message_id, message)...])
--
--   record      the job record, created only where none exists ({ns}:job:{id} SET NX, indexed in
--               {ns}:jobs); a record already there bound to another payload_hash is a conflict:
--               nothing written, returns "key". One bound to the same hash (or to none) is this
--               run: the spec is registered, nothing else written, returns 1.
--   replace     "0": another digest registered as the name's newest ({ns}:pipeline:{name} field
--               latest) is a conflict: nothing written, returns "pipeline:" .. that digest
--   canonical   the spec's JSON, stored under its digest (HSETNX) with the name added to
--               {ns}:pipelines; "" when the client stored this version already. The digest is
--               made the newest either way (written only when it is not already). "" for a
--               version Redis does not hold: nothing written, returns "spec".
--   event       trace events, each added to the stream {ns}:trace:{job_id} (capped near trace_maxlen)
--   message     dramatiq's encoded message, stored under message_id in {ns}:{queue}.msgs and pushed
--               on its lane of the queue (lanes_lib.lua); then one wake-up token per message on
--               {ns}:{queue}.wake, at most wake_cap kept
--
-- Returns 0 when the job was created with its messages.

local ns = KEYS[1]
local job_id, hash, record, created_at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local trace_maxlen, wake_cap = ARGV[5], tonumber(ARGV[6])
local name, digest, replace, canonical = ARGV[7], ARGV[8], ARGV[9] == "1", ARGV[10]
local n_events = tonumber(ARGV[11])
local pipeline = ns .. ":pipeline:" .. name
-- name "": the spec was registered by a call of its own (a shard's job: see StartRun), none here;
-- job_id "": that registration alone, on the namespace's own keys (KEYS[1] "{ns}")
local register, start = name ~= "", job_id ~= ""

local latest
if register then
    latest = redis.call("hget", pipeline, "latest")
    -- A version the client believes stored but Redis no longer holds (the name's hash lost: a restart
    -- without persistence, an eviction): nothing written, the client sends it again with its JSON.
    -- Checked only when the name's newest is missing or another digest, so a run of the newest costs
    -- no command more.
    if canonical == "" and (not latest or (latest ~= digest and redis.call("hexists", pipeline, digest) == 0)) then
        return "spec"
    end
end
local job, created = ns .. ":job:" .. job_id, false
if start then
    created = redis.call("set", job, record, "nx")
    if not created then
        local stored = cjson.decode(redis.call("get", job))["payload_hash"]
        if stored ~= nil and stored ~= cjson.null and stored ~= hash then return "key" end
    end
end
if register then
    if not replace and latest and latest ~= digest then
        if created then redis.call("del", job) end
        return "pipeline:" .. latest
    end
    if canonical ~= "" then
        redis.call("hsetnx", pipeline, digest, canonical)
        redis.call("sadd", ns .. ":pipelines", name)
    end
    if latest ~= digest then redis.call("hset", pipeline, "latest", digest) end
end
if not created then return 1 end

redis.call("zadd", ns .. ":jobs", "nx", created_at, job_id)
local first = 12
for i = first, first + 2 * n_events - 1, 2 do
    redis.call("xadd", ns .. ":trace:" .. ARGV[i], "maxlen", "~", trace_maxlen, "*", "e", ARGV[i + 1])
end
local per_queue, order = {}, {}
for i = first + 2 * n_events, #ARGV, 3 do
    local queue, id, data = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local q = per_queue[queue]
    if not q then
        q = {}
        per_queue[queue] = q
        order[#order + 1] = queue
    end
    q[#q + 1] = id
    q[#q + 1] = data
end
for _, queue in ipairs(order) do
    local q, base = per_queue[queue], ns .. ":" .. queue
    -- bodies in commands of up to `slice` messages each (Lua's stack bounds how many arguments one
    -- call may take: a failure here would leave the record without its messages)
    local slice = 1000
    for from = 1, #q, 2 * slice do
        redis.call("hset", base .. ".msgs", unpack(q, from, math.min(#q, from + 2 * slice - 1)))
    end
    for j = 1, #q, 2 do lane_push(base, q[j], q[j + 1], false) end
    local tokens = {}
    for t = 1, math.min(#q / 2, wake_cap) do tokens[t] = 1 end
    if redis.call("rpush", base .. ".wake", unpack(tokens)) > wake_cap then
        redis.call("ltrim", base .. ".wake", -wake_cap, -1)
    end
end
return 0
