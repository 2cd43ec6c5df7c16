-- The mesh's consumer-side commands over dramatiq's key layout (see broker/keys.py); a queue's
-- ready messages wait in lanes by priority and flow key (lanes_lib.lua, run before this).
-- Each command is one atomic step, so no crash or lost connection can leave a message
-- both settled and pending, or neither.
--
-- prefix: the namespace's key prefix, "{ns}" (broker/keys.py); every key this script touches is built from it.
--
-- settle(keys=[prefix], args=[command, caller_ms (unused), queue, worker_id, heartbeat_timeout_ms, ...])
--
--   fetch     n [beat [nonce, lease_ms, ttl_s [records]]]
--                                    -> {id1, data1, id2, data2, ...}; unless beat is "0", also heartbeat
--                                       and reap; with a nonce, each message's key is claimed and
--                                       each id and data are followed by the claim ({key, "run"|"busy"|
--                                       "done", token, ...} as claim.lua answers, or 0: no key found);
--                                       with records "1", {key, record, "run"|...}: the job record of
--                                       a message whose claim it won ("": none, or over RECORD_MAX)
--   heartbeat                        -> 1
--   ack       ttl_s, (id, claim, owner, result)...
--                                    -> {1|0 (+2), ...}: the messages are settled; each with a claim has
--                                       its key stored as done with its result (claim_lib.lua) in the
--                                       same step (0: the lease was lost); +2: this worker no longer
--                                       held the message (reaped while paused), its body is left alone
--   done      ttl_s, id, claim, owner, token, result
--                                    -> as ack, for one message whose failure struck after its success
--                                       was recorded: its key is stored as done even though the
--                                       failure freed the claim (still at this token: nobody took it)
--   retry     id, new_id, new_data, stat, route, job
--                                    -> 1: the copy goes on {queue}.DQ, the original is settled; 3:
--                                       this worker no longer held the original, nothing is done
--   dead      id, entry_id, entry, raw, stat, route, agent, class, job, job_id
--                                    -> 2 (nothing done) when another entry holds entry_id; 3 (nothing
--                                       done) when this worker no longer held the message; else 1:
--                                       the entry lands in the mesh DLQ and its agent and class
--                                       indexes (and its job's, when job_id is not ""), the original
--                                       is settled (route: "{class}:{route}", counted in
--                                       {ns}:routes); retention is the sweep's (dlq/retention.py)
--   job (retry, dead): the job-record change of the failed attempt (JSON, see apply_job below, or
--   ""): it lands in the same step as the message's fate, and a record that
--   changed since the caller read it is refused before anything is written (-1: read and retry)
--   requeue   id...                  -> unsettled messages go back to the head of their lanes
--   push      id, data               -> a new message stored and put at the tail of its lane (and a
--                                       wake-up token): what dramatiq's enqueue does
--   reclaim   keep_id...             -> every message this worker holds on the queue except
--                                       keep_id... goes back to the head of the queue
--
-- heartbeat (and fetch when asked) heartbeats for the worker and returns to their queues what dead
-- workers left unsettled, so recovery does not wait for traffic on any particular queue. The other
-- commands leave the heartbeat alone: a consumer beats once per quarter of the timeout, and runs
-- no TIME, ZSCORE or ZADD for every message it settles.

local ns = KEYS[1]
local command = ARGV[1]
local queue = ARGV[3]
local worker = ARGV[4]
local heartbeat_timeout = tonumber(ARGV[5])

local heartbeats = ns .. ":__heartbeats__"
local acks_prefix = ns .. ":__acks__."
local queue_key = ns .. ":" .. queue
local msgs_key = queue_key .. ".msgs"
local acks = acks_prefix .. worker .. "." .. queue
local held_prefix = ns .. ":__held__."
local FETCH_MAX = 1000

-- The Redis server's clock, never the caller's (ARGV[2], kept for dramatiq's argument layout):
-- heartbeats, reaping and DLQ times are compared across hosts, and one skewed host must neither
-- make live workers look dead nor keep dead ones looking alive. (Redis 7 replicates scripts by
-- their effects, so TIME may be read before writing.) Read only by the commands that need it.
local function server_ms()
    local t = redis.call("time")
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function beat(now)
    -- A worker that was itself silent longer than the timeout has most likely lived through a Redis
    -- outage, like every other worker: recovery waits one more timeout for them all to beat again.
    local previous = tonumber(redis.call("zscore", heartbeats, worker))
    if previous and now - previous > heartbeat_timeout then
        redis.call("set", ns .. ":__reap_after__", now + heartbeat_timeout, "PX", heartbeat_timeout * 2)
    end
    redis.call("zadd", heartbeats, now, worker)
end

local function reap(now)
    -- Workers whose heartbeat stopped: whatever they held goes back to the head of its queue.
    if now < (tonumber(redis.call("get", ns .. ":__reap_after__")) or 0) then return end
    local dead = redis.call("zrangebyscore", heartbeats, 0, now - heartbeat_timeout)
    for _, dead_worker in ipairs(dead) do
        local held_queues = held_prefix .. dead_worker
        for _, q in ipairs(redis.call("smembers", held_queues)) do
            local dead_acks = acks_prefix .. dead_worker .. "." .. q
            local q_key = ns .. ":" .. q
            for _, id in ipairs(redis.call("smembers", dead_acks)) do
                local data = redis.call("hget", q_key .. ".msgs", id)
                if data then
                    lane_push(q_key, id, data, true)
                    redis.call("rpush", q_key .. ".wake", 1)
                    redis.call("hincrby", ns .. ":stats", "recovered", 1)
                end
            end
            redis.call("ltrim", q_key .. ".wake", -64, -1)
            redis.call("del", dead_acks)
        end
        redis.call("del", held_queues)
        redis.call("zrem", heartbeats, dead_worker)
    end
end

-- The job id of a message as the mesh encodes it (its envelope's job_id right after its key), or nil:
-- its record, when at most RECORD_MAX bytes, is what the step's pick-up is computed from, with no read
-- of its own (broker/step_write.py checks it is still the record when it writes); "" otherwise.
local RECORD_MAX = 65536
local function message_job(data, key)
    local _, e = string.find(data, '"args":[{"key":"' .. key .. '","job_id":"', 1, true)
    if not e then return nil end
    local close = string.find(data, '"', e + 1, true)
    if not close or close == e + 1 then return nil end
    local job_id = string.sub(data, e + 1, close - 1)
    if string.find(job_id, "\\", 1, true) then return nil end
    return job_id
end

-- The records of the fetched messages that won their claims (wanted: {verdict, job_id}), each put in
-- its verdict's second place: each job's record read once (a fan-out's siblings fetched together share
-- it), RECORDS_AT_ONCE records a MGET, where each message read its own with a GETRANGE. A record over
-- RECORD_MAX is handed back as "" (the pick-up reads it itself). A MGET reads its records whole: once
-- one came back over RECORD_MAX, the rest are read with a GETRANGE of RECORD_MAX + 1 bytes each, so a
-- fetch of many messages of jobs with large records (a pipeline's outputs: several MB each) reads at
-- most RECORDS_AT_ONCE of them whole, not all (1,000 messages of 5 MB records: 5 GB copied into the
-- script, the server blocked for seconds and the fetch's answer lost to the client's timeout).
local RECORDS_AT_ONCE = 16
local function fetch_records(wanted)
    local names, at = {}, {}
    for _, w in ipairs(wanted) do
        if not at[w[2]] then
            names[#names + 1] = ns .. ":job:" .. w[2]
            at[w[2]] = #names
        end
    end
    local got, large, i = {}, false, 1
    while i <= #names do
        if large then
            -- (redis.pcall: a key of another type answers as no record, where MGET's nil did, rather
            -- than fail the fetch after its messages were popped)
            local record = redis.pcall("getrange", names[i], 0, RECORD_MAX)
            got[i] = type(record) == "string" and record
            i = i + 1
        else
            local last = math.min(i + RECORDS_AT_ONCE - 1, #names)
            local part = redis.call("mget", unpack(names, i, last))
            for j = i, last do
                local record = part[j - i + 1]
                if record and #record > RECORD_MAX then
                    large, record = true, false
                end
                got[j] = record
            end
            i = last + 1
        end
    end
    for _, w in ipairs(wanted) do
        local record = got[at[w[2]]]
        if record and #record <= RECORD_MAX then w[1][2] = record end
    end
end

local function push_back(id)
    local data = redis.call("hget", msgs_key, id)
    if data then
        lane_push(queue_key, id, data, true)
        redis.call("rpush", queue_key .. ".wake", 1)
        redis.call("ltrim", queue_key .. ".wake", -64, -1)
    end
end

-- Whether this worker still holds message id (in its acks set, its body in the queue's hash). A
-- worker paused past the heartbeat timeout was reaped: its acks set is gone and the message may be
-- running elsewhere, so whatever it settles late must not touch the message.
local function holds(id)
    return redis.call("sismember", acks, id) == 1 and redis.call("hexists", msgs_key, id) == 1
end

-- Takes message id out of this worker's hands and deletes its body: true when this worker held it
-- (its own removal from its acks set succeeded), false, with nothing changed, otherwise.
local function settles(id)
    if redis.call("srem", acks, id) == 0 then return false end
    return redis.call("hdel", msgs_key, id) == 1
end

-- The job-record change of a failed attempt (broker/settle.py JobWrite): {"job": key, "sha": sha1
-- of the record it was computed from, "new": the record (absent: unchanged), "ttl": s (absent: keep
-- the record's), "trace": key, "maxlen": n, "events": [...], "running": key, "member": ..., "claim":
-- key, "owner": ..., "msgs": [{"hash", "queue", "wake", "rid", "data"}]: messages the change sends,
-- "incr": [field, ...]: {ns}:stats fields to add 1 to (a compensation sent or failed: broker/observe.py),
-- "compact": [queue, job id]: the change ends the job, which is queued for compaction (broker/compact.py)}.
local function job_of(arg)
    if not arg or arg == "" then return nil end
    return cjson.decode(arg)
end

local function job_conflict(job)
    if not job or not job.new then return false end
    local cur = redis.call("get", job.job)
    return (cur and redis.sha1hex(cur) or "") ~= job.sha
end

local function apply_job(job)
    if not job then return end
    if job.new then
        if job.ttl then
            redis.call("set", job.job, job.new, "EX", job.ttl)
        else
            redis.call("set", job.job, job.new, "KEEPTTL")
        end
    end
    for _, m in ipairs(job.msgs or {}) do
        redis.call("hset", m.hash, m.rid, m.data)
        lane_push(m.queue, m.rid, m.data, false)
        redis.call("rpush", m.wake, 1)
        redis.call("ltrim", m.wake, -64, -1)
    end
    for _, ev in ipairs(job.events or {}) do
        redis.call("xadd", job.trace, "MAXLEN", "~", job.maxlen, "*", "e", ev)
    end
    for _, field in ipairs(job.incr or {}) do
        redis.call("hincrby", ns .. ":stats", field, 1)
    end
    if job.ttl and job.trace then redis.call("expire", job.trace, job.ttl) end
    if job.compact then redis.call("zadd", job.compact[1], redis.call("time")[1], job.compact[2]) end
    if job.member then redis.call("zrem", job.running, job.member) end
    if job.claim then claim_free(job.claim, job.owner) end
end

if command == "fetch" then
    -- Unless ARGV[7] is "0", heartbeat and recover dead workers' messages too (a consumer asks once
    -- per quarter of the heartbeat timeout, not on every fetch). With ARGV[8..10] (nonce, lease_ms,
    -- ttl_s), each message's key is claimed in the same step, for owner "{worker}:{nonce}:{n}", n the
    -- message's place in the answer (1, 2, ...): never a producer's id, which may hold the claim
    -- string's separator.
    local now = nil
    if ARGV[7] ~= "0" then
        now = server_ms()
        beat(now)
        reap(now)
    end
    -- Every fetch (one SADD): messages in hand are always where a reaper looks, also right after
    -- a false reap removed this worker's entry and before its next beat.
    redis.call("sadd", held_prefix .. worker, queue)
    -- At most FETCH_MAX: the ids are unpacked into HMGET and SADD below, and Lua unpacks ~8,000
    -- values at most; a script that failed there would have popped ids nobody holds.
    local nonce, batch = ARGV[8], nil
    -- What the fetch took, and the claims it won, noted as it goes: a command refused after the
    -- first pop (a key of the wrong type: the acks set, the bodies' hash, the stats hash) fails the
    -- fetch, and Redis keeps what ran before it, so the messages go back to their lanes and the claims are
    -- given back before it fails, rather than popped into no list.
    local popped, won = {}, {}
    local function fetched()
        local ids, data, fence = lanes_fetch(queue_key, math.min(tonumber(ARGV[6]), FETCH_MAX), nonce ~= nil, popped)
        if #ids == 0 then return {} end
        local records = ARGV[11] == "1"
        if nonce then
            batch = claims_open(ns .. ":stats", tonumber(ARGV[9]), tonumber(ARGV[10]), now or server_ms(), fence)
        end
        local out, held, wanted = {}, {}, {}
        for i, id in ipairs(ids) do
            if data[i] then
                held[#held + 1] = id
                out[#out + 1] = id
                out[#out + 1] = data[i]
                if batch then
                    local key = message_key(data[i])
                    if key then
                        local owner = worker .. ":" .. nonce .. ":" .. #held
                        local verdict = claim_take(batch, ns .. ":claim:" .. key, owner)
                        if verdict[1] == "run" then won[#won + 1] = {ns .. ":claim:" .. key, batch.prior, verdict[3]} end
                        if records then
                            local job_id = verdict[1] == "run" and message_job(data[i], key)
                            table.insert(verdict, 1, "")
                            if job_id then wanted[#wanted + 1] = {verdict, job_id} end
                        end
                        table.insert(verdict, 1, key)
                        out[#out + 1] = verdict
                    else
                        out[#out + 1] = 0
                    end
                end
            end
        end
        if #wanted > 0 then fetch_records(wanted) end
        if batch then claims_close(batch) end
        -- last: refused, it added nothing, so the give-back takes nothing out of the acks set
        if #held > 0 then redis.call("sadd", acks, unpack(held)) end
        return out
    end
    local ok, out = pcall(fetched)
    if ok then return out end
    -- Given back: the claims won, each as it was found (claim_give_back), the fencing counter moved
    -- past their tokens if it can be, and the messages at the head of their lanes, in order, the lanes'
    -- turns as they were (lanes_give_back; the SADD to the acks set is the fetch's last command:
    -- refused, it added nothing). Then the fetch fails with the refusal, which the consumer logs and
    -- retries.
    for _, w in ipairs(won) do claim_give_back(w[1], w[2], w[3], ns .. ":stats") end
    if batch then pcall(claims_close, batch) end
    lanes_give_back(queue_key, popped)
    error(redis.error_reply(type(out) == "table" and out.err or tostring(out)))

elseif command == "heartbeat" then
    local now = server_ms()
    beat(now)
    reap(now)
    redis.call("sadd", held_prefix .. worker, queue)
    return 1

elseif command == "ack" then
    -- Settles a group of messages that succeeded (or need no more than an ack). ARGV[6]: the dedup
    -- window (s); then per message: id, claim key ("": none), owner, result. A message with a claim
    -- has its key stored as done with its result in the same step. Per message: 1 done (or already
    -- done, or no claim), 0 the lease was lost to another owner (the message is acked all the same).
    -- The claim is fenced by its owner, so a done key is stored whatever became of the message;
    -- the body is deleted only by the worker that still holds the message (+2: it did not).
    local ttl, out = tonumber(ARGV[6]), {}
    for i = 7, #ARGV, 4 do
        local done = ARGV[i + 1] ~= "" and claim_done(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ttl) or 1
        out[#out + 1] = settles(ARGV[i]) and done or done + 2
    end
    return out

elseif command == "done" then
    -- An attempt whose success reached the job record and then failed (a time limit right after the
    -- write): settled as done, its key stored as done with the step's result, so no other message
    -- under the key runs the effect again. ARGV[6..11]: ttl_s, id, claim key ("": none), owner,
    -- token, result. The failure already freed the claim: a free claim still at this attempt's token
    -- was taken by nobody since, and is this attempt's to mark done.
    local ttl, id, key, owner, token, result = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
    local done = 1
    if key ~= "" then
        local state, _, held_token = claim_read(key)
        if state == "free" and held_token == tonumber(token) then
            redis.call("set", key, claim_value("done", held_token, 0, "", result), "EX", ttl)
        else
            done = claim_done(key, owner, result, ttl)
        end
    end
    return settles(id) and done or done + 2

elseif command == "retry" then
    local id, new_id, new_data, stat = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
    local job = job_of(ARGV[11])
    if job_conflict(job) and holds(id) then return -1 end
    -- Safe to run twice (a re-sent ack after a lost reply, even once the copy has moved on), and
    -- by a superseded owner: only the call that settles the message this worker still holds pushes
    -- the copy, counts it and writes the job record (3: it held nothing).
    if not settles(id) then return 3 end
    do
        redis.call("hsetnx", queue_key .. ".DQ.msgs", new_id, new_data)
        redis.call("rpush", queue_key .. ".DQ", new_id)
        redis.call("hincrby", ns .. ":stats", stat, 1)
        redis.call("hincrby", ns .. ":routes", ARGV[10], 1)
        redis.call("hincrby", ns .. ":outcomes", queue .. ":" .. stat, 1)
        apply_job(job)
    end
    return 1

elseif command == "dead" then
    local id, entry_id, entry, raw, stat = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
    local agent, class = ARGV[12], ARGV[13]
    local dlq = ns .. ":dlq"
    local job = job_of(ARGV[14])
    local pending = holds(id)
    if pending and job_conflict(job) then return -1 end
    -- Another message's dead letter under the same entry id (a producer gave two messages one id):
    -- nothing is settled, and the caller picks an id of this message's own (2).
    if pending and redis.call("zscore", dlq, entry_id) then return 2 end
    -- Safe to run twice, and by a superseded owner: only the call that settles the message this
    -- worker still holds writes the entry, counts it and writes the job record (3: it held nothing).
    if not settles(id) then return 3 end
    do
        local now = server_ms()
        if redis.call("zadd", dlq, "NX", now, entry_id) == 1 then
            redis.call("hset", dlq .. ":" .. entry_id, "entry", entry, "raw", raw, "agent", agent, "class", class)
            redis.call("zadd", dlq .. ".agent:" .. agent, now, entry_id)
            redis.call("sadd", dlq .. ".agents", agent)
            redis.call("zadd", dlq .. ".class:" .. class, now, entry_id)
            if ARGV[15] and ARGV[15] ~= "" then
                redis.call("zadd", dlq .. ".job:" .. ARGV[15], now, entry_id)
                redis.call("set", dlq .. ".jobs.since", now, "NX")
            end
            redis.call("hincrby", ns .. ":stats", stat, 1)
            redis.call("hincrby", ns .. ":routes", ARGV[11], 1)
            redis.call("hincrby", ns .. ":outcomes", queue .. ":" .. stat, 1)
        end
        apply_job(job)
    end
    return 1

elseif command == "requeue" then
    -- From the last: the ids go back to the head of their lanes in the order given.
    for i = #ARGV, 6, -1 do
        if redis.call("srem", acks, ARGV[i]) == 1 then
            push_back(ARGV[i])
        end
    end
    return 1

elseif command == "push" then
    -- A new message (dramatiq's enqueue: a delayed message come due, an actor's send) into its lane.
    local id, data = ARGV[6], ARGV[7]
    redis.call("hset", msgs_key, id, data)
    lane_push(queue_key, id, data, false)
    redis.call("rpush", queue_key .. ".wake", 1)
    redis.call("ltrim", queue_key .. ".wake", -64, -1)
    return 1

elseif command == "reclaim" then
    local keep = {}
    for i = 6, #ARGV do keep[ARGV[i]] = true end
    local n = 0
    for _, id in ipairs(redis.call("smembers", acks)) do
        if not keep[id] then
            redis.call("srem", acks, id)
            push_back(id)
            n = n + 1
        end
    end
    if n > 0 then redis.call("hincrby", ns .. ":stats", "reclaimed", n) end
    return n
end

return redis.error_reply("unknown settle command " .. tostring(command))
