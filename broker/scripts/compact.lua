-- Compaction and count retention of finished jobs (see broker/compact.py and broker/keys.py).
--
-- prefix: the namespace's key prefix, "{ns}" (broker/keys.py); every key this script touches is built from it.
--
-- compact(keys=[prefix], args=[command, now_s, ...])
--
--   compact   keep, (job_id, sha, record, last_id, name, ended_s)...
--                      -> {jobs out of the queue, jobs compacted}. A job whose record is still the one
--                         read (``sha``: its sha1, "" when it was gone) leaves {ns}:jobs.compact, and,
--                         unless ``record`` is "" (left as it is), the record is replaced by ``record`` (KEEPTTL) and
--                         its trace stream loses every entry up to ``last_id`` (the stream is deleted
--                         when nothing came after); with ``keep`` = 1 it joins {ns}:jobs.kept:{name} (and
--                         {ns}:jobs.kept), scored by when it ended. A record that changed since it was read is left in the queue
--                         for the next sweep (it may have ended again since a pass read it active).
--   evict     name, keep, terminal_states, max_bytes, job_id...
--                      -> {jobs removed, jobs looked at}: it stops after the job whose record took the
--                         records read past ``max_bytes`` (decoding them holds Redis); the caller
--                         sends the rest again. A job is looked at only while it is still outside the newest
--                         ``keep`` of {ns}:jobs.kept:{name} (the caller read the index earlier: another
--                         sweep may have removed older ones since, or the job ended again and is now
--                         among the newest); then it leaves the index; one whose record is gone
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
        local cur = redis.call("get", key)
        if (cur and redis.sha1hex(cur) or "") == sha then
            if record == "" then
                out[#out + 1] = id
            else
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
    -- one ZREM for the call (at most compact.py's BATCH ids, or CALL_BYTES of records): a record changed since it was read
    -- stays queued for the next pass
    local removed = #out > 0 and redis.call("zrem", queue, unpack(out)) or 0
    if done > 0 then redis.call("hincrby", ns .. ":stats", "compacted_jobs", done) end
    return {removed, done}

elseif command == "evict" then
    local name, keep = ARGV[3], tonumber(ARGV[4])
    local terminal = {}
    for state in string.gmatch(ARGV[5], "[^,]+") do terminal[state] = true end
    local index, removed = ns .. ":jobs.kept:" .. name, 0
    local max_bytes, read, looked = tonumber(ARGV[6]), 0, 0
    local function evict(id)
        local key = ns .. ":job:" .. id
        local raw = redis.call("get", key)
        if raw then read = read + #raw end
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
    for i = 7, #ARGV do
        -- only while still outside the newest N: the caller read the index earlier, and another sweep
        -- may have removed older jobs since, or this one ended again and is among the newest now
        local rank = redis.call("zrank", index, ARGV[i])
        if rank and rank < redis.call("zcard", index) - keep then evict(ARGV[i]) end
        looked = looked + 1
        if read >= max_bytes then break end
    end
    forget_name(name)
    if removed > 0 then redis.call("hincrby", ns .. ":stats", "swept_count", removed) end
    return {removed, looked}

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
