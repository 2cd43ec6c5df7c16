-- Retention of the mesh's indexes (see broker/keys.py and broker/retention.py). Records expire by
-- their own TTL; sorted-set members cannot, so each command looks at the members it is given and
-- removes those whose key is gone, atomically with the check: a key written again meanwhile keeps
-- its member.
--
-- prefix: the namespace's key prefix, "{ns}" (broker/keys.py); every key this script touches is built from it.
--
-- retention(keys=[prefix], args=[command, now_s, retention_ms, terminal_states, member...])
--
--   jobs      job ids       -> a member whose record is gone leaves {ns}:jobs and is tombstoned in
--                              {ns}:jobs.expired, and what is left of its trace goes (events written
--                              after its compaction, broker/compact.py, start a stream without TTL). A record without a TTL gets what is left of its
--                              retention (its trace too) when it ended (written before retention
--                              existed), or when it is only a re-send of a job that already ran to
--                              the end and expired: every step queued, every step's key done, so
--                              the claim answers each delivery as a duplicate and it never runs;
--                              never while a step awaits approval or waits (no TTL then, by design).
--   running   "job/step"    -> a member whose job record is gone leaves {ns}:running
--   notes     note ids      -> a member whose note is gone leaves {ns}:notes; a note without a TTL
--                              gets what is left of its retention, counted from its written time
--
-- terminal_states: comma-separated job states that end a job. Returns the members removed,
-- counted in {ns}:stats as swept_{command}.

local ns = KEYS[1]
local command = ARGV[1]
local now = tonumber(ARGV[2])
local retention_ms = tonumber(ARGV[3])
local terminal = {}
for state in string.gmatch(ARGV[4], "[^,]+") do terminal[state] = true end

local function left_ms(since_s)
    return math.max(1, math.floor(since_s * 1000 + retention_ms - now * 1000))
end

local function waits(record)
    if type(record.steps) ~= "table" then return false end
    for _, step in pairs(record.steps) do
        if type(step) == "table" and (step.state == "awaiting_approval" or step.state == "waiting") then
            return true
        end
    end
    return false
end

local function ended_at(record)
    -- a step waiting for a person (or a timer, an event) keeps its job: ended or not, it has no TTL
    -- until the decision or the wait's end (broker/approvals.py, broker/waits.py) gives it its retention
    if waits(record) then return nil end
    if terminal[record.state] then
        return tonumber(record.finished_at) or tonumber(record.updated_at) or now
    end
    if type(record.steps) ~= "table" then return nil end
    local steps = 0
    for _, step in pairs(record.steps) do
        if step.state ~= "queued" or type(step.key) ~= "string" then return nil end
        if claim_read(ns .. ":claim:" .. step.key) ~= "done" then return nil end
        steps = steps + 1
    end
    if steps == 0 then return nil end
    return tonumber(record.created_at) or now
end

local removed = 0
if command == "jobs" then
    for i = 5, #ARGV do
        local id = ARGV[i]
        local key = ns .. ":job:" .. id
        if redis.call("exists", key) == 0 then
            -- events written after the job was compacted started a stream of their own (no TTL)
            redis.call("del", ns .. ":trace:" .. id)
            if redis.call("zrem", ns .. ":jobs", id) == 1 then
                redis.call("zadd", ns .. ":jobs.expired", now, id)
                removed = removed + 1
            end
        elseif redis.call("pttl", key) == -1 then
            local ok, record = pcall(cjson.decode, redis.call("get", key))
            local ended = ok and type(record) == "table" and ended_at(record)
            if ended then
                local ttl = left_ms(ended)
                redis.call("pexpire", key, ttl)
                redis.call("pexpire", ns .. ":trace:" .. id, ttl)
            end
        end
    end
elseif command == "running" then
    for i = 5, #ARGV do
        local job_id = string.match(ARGV[i], "^([^/]+)/")
        if job_id and redis.call("exists", ns .. ":job:" .. job_id) == 0 then
            removed = removed + redis.call("zrem", ns .. ":running", ARGV[i])
        end
    end
elseif command == "notes" then
    for i = 5, #ARGV do
        local id = ARGV[i]
        local key = ns .. ":note:" .. id
        if redis.call("exists", key) == 0 then
            removed = removed + redis.call("zrem", ns .. ":notes", id)
        elseif redis.call("pttl", key) == -1 then
            local written = tonumber(redis.call("zscore", ns .. ":notes", id)) or now
            redis.call("pexpire", key, left_ms(written))
        end
    end
else
    return redis.error_reply("unknown retention command " .. tostring(command))
end

if removed > 0 then redis.call("hincrby", ns .. ":stats", "swept_" .. command, removed) end
return removed
