-- Compaction and count retention of finished jobs (see broker/compact.py and broker/keys.py).
--
-- compact(keys=[namespace], args=[command, now_s, ...])
--
--   compact   keep, (job_id, sha, record, last_id, name, ended_s)...
--                      -> {jobs out of the queue, jobs compacted}. Each job leaves {ns}:jobs.compact. When ``sha`` is the sha1
--                         of its record as it is now, the record is replaced by ``record`` (KEEPTTL) and
--                         its trace stream loses every entry up to ``last_id`` (the stream is deleted
--                         when nothing came after); with ``keep`` = 1 it joins {ns}:jobs.kept:{name} (and
--                         {ns}:jobs.kept), scored by when it ended. A record that changed since it was read is left in the queue
--                         for the next sweep; ``sha`` "" only takes the job out of the queue (gone, or
--                         active again: its next end queues it again).
--   evict     name, retention_ms, terminal_states, job_id...
--                      -> jobs removed. Each job leaves {ns}:jobs.kept:{name}; one whose record is gone
--                         is left to the age sweep's tombstone; one still ended and holding no dead letter
--                         and no approval wait is removed: record, trace, effect ledgers, its {ns}:jobs
--                         member, and a tombstone in {ns}:jobs.expired (as the age sweep does).
--   tidy      name, job_id...
--                      -> members removed from {ns}:jobs.kept:{name}: those whose record is gone; the
--                         name leaves {ns}:jobs.kept once its index is empty.
--
-- Counted in {ns}:stats: compacted_jobs, swept_count.

local ns = KEYS[1]
local command = ARGV[1]
local now = tonumber(ARGV[2])

local function forget_name(name)
    if redis.call("exists", ns .. ":jobs.kept:" .. name) == 0 then redis.call("srem", ns .. ":jobs.kept", name) end
end

local function holds(record)
    -- what count retention never takes: dead letters a replay must find, a step waiting for a person,
    -- a timer or an event
    if type(record.steps) ~= "table" then return false end
    for _, step in pairs(record.steps) do
        if type(step) == "table" and (step.state == "dead_lettered" or step.state == "unknown"
                or step.state == "awaiting_approval" or step.state == "waiting") then
            return true
        end
    end
    return false
end

if command == "compact" then
    local keep, done, queue, out = ARGV[3] == "1", 0, ns .. ":jobs.compact", {}
    for i = 4, #ARGV, 6 do
        local id, sha, record, last_id, name = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
        local key = ns .. ":job:" .. id
        if sha == "" then
            out[#out + 1] = id
        else
            local cur = redis.call("get", key)
            if cur and redis.sha1hex(cur) == sha then
                redis.call("set", key, record, "KEEPTTL")
                local trace = ns .. ":trace:" .. id
                if last_id ~= "" then
                    local top = redis.call("xrevrange", trace, "+", "-", "COUNT", 1)[1]
                    if top and top[1] ~= last_id then
                        -- events written since the read stay: every entry up to last_id goes
                        local ms, seq = string.match(last_id, "^(%d+)-(%d+)$")
                        redis.call("xtrim", trace, "MINID", ms .. "-" .. (tonumber(seq) + 1))
                    else
                        redis.call("del", trace)
                    end
                end
                if keep then
                    redis.call("zadd", ns .. ":jobs.kept:" .. name, ARGV[i + 5], id)
                    redis.call("sadd", ns .. ":jobs.kept", name)
                end
                out[#out + 1] = id
                done = done + 1
            end
        end
    end
    -- one ZREM for the batch (at most compact.py's BATCH ids): a record changed since it was read
    -- stays queued for the next pass
    local removed = #out > 0 and redis.call("zrem", queue, unpack(out)) or 0
    if done > 0 then redis.call("hincrby", ns .. ":stats", "compacted_jobs", done) end
    return {removed, done}

elseif command == "evict" then
    local name, retention_ms = ARGV[3], tonumber(ARGV[4])
    local terminal = {}
    for state in string.gmatch(ARGV[5], "[^,]+") do terminal[state] = true end
    local index, removed = ns .. ":jobs.kept:" .. name, 0
    for i = 6, #ARGV do
        local id = ARGV[i]
        local key = ns .. ":job:" .. id
        local raw = redis.call("get", key)
        local ok, record = false, nil
        if raw then ok, record = pcall(cjson.decode, raw) end
        if raw and ok and type(record) == "table" and terminal[record.state] and not holds(record)
                and redis.call("pttl", key) ~= -1 then
            redis.call("del", key, ns .. ":trace:" .. id)
            if type(record.steps) == "table" then
                for step_id, step in pairs(record.steps) do
                    if type(step) == "table" and step.effect ~= nil then
                        redis.call("del", ns .. ":ledger:" .. id .. ":" .. step_id)
                    end
                end
            end
            if redis.call("zrem", ns .. ":jobs", id) == 1 then
                redis.call("zadd", ns .. ":jobs.expired", now, id)
            end
            removed = removed + 1
        end
        -- gone (the age sweep tombstones it), active again (its next end indexes it again), or kept by
        -- age alone (dead letters, an approval wait): out of the count either way
        redis.call("zrem", index, id)
    end
    forget_name(name)
    if removed > 0 then redis.call("hincrby", ns .. ":stats", "swept_count", removed) end
    return removed

elseif command == "tidy" then
    local name, removed = ARGV[3], 0
    local index = ns .. ":jobs.kept:" .. name
    for i = 4, #ARGV do
        if redis.call("exists", ns .. ":job:" .. ARGV[i]) == 0 then
            removed = removed + redis.call("zrem", index, ARGV[i])
        end
    end
    forget_name(name)
    return removed
end

return redis.error_reply("unknown compact command " .. tostring(command))
