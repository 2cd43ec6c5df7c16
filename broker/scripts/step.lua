-- A group of steps' job-record writes (broker/step_write.py), each a compare-and-set fenced by its
-- claim: one call writes what a WATCH/MULTI transaction per step wrote, with no WATCH, no read
-- round trip and no MULTI. Runs after claim_lib.lua and lanes_lib.lua.
--
-- step(keys=[prefix], args=[ttl_s, item...]), each item being the arguments; KEYS[1], the namespace's
-- prefix ("{ns}"), is not read: a Redis Cluster routes the call by it (every key below is in its slot)
--
--   job, sha, claim, owner, token, shared, done, result, id, acks, msgs, e, (eager...) x e, n,
--   (count, command...) x n
--
--   job      the record's key; sha: the record the write was computed from, as its bytes, or as their
--            sha1 (40 hex digits: a record of 40 bytes or fewer, or a large one)
--   claim    the attempt's claim key ("": none), its owner and fencing token: the write lands only
--            while that owner holds the claim (shared "1": while the key is done, for an attempt taking
--            another job's stored output), so an owner whose key was taken over (a paused one) writes
--            nothing
--   done     "1": the claim is stored as done with result (the dedup window: ttl_s) by the same write;
--            a claim already done at this token is this write's own, landed before (it is sent again):
--            answered 1 (or 2) with nothing more written
--   id       "": none; else the message this write settles (a success): it leaves the worker's
--            acks set and its body is deleted from msgs, as the ack would
--   e        0, or 9 and the arguments of a fetch of one message the write hands straight to its worker
--            (a success whose next step goes to a queue its worker consumes, with room): the queue's
--            key, the worker's acks set there, its held set and the queue's name, the stats hash, the
--            claims' key prefix, the claim's owner and lease (ms), and owed: "1" when the write's
--            commands leave out one wake-up token of the messages they push on that queue (the one
--            the fetch would take back: that consumer needs none), "0" when they push all theirs.
--            Once the write landed, the queue's next message in lane order (the one a fetch would
--            take: the write's own, or one waiting before it) is fetched and claimed as settle.lua's
--            fetch would, for that worker, and a wake-up token taken back unless owed; an owed token
--            is pushed when the fetch takes nothing, or is not run (the write refused a command, or
--            its message was no longer this worker's), so every message left waiting has its
--            token. e > 9: the next step's
--            pick-up follows (rid, sentinel, m, (count, command...) x m): when the message fetched is
--            rid (the write's own message of the same job's next step) and its claim is won, the
--            pick-up's commands run too, with every occurrence of sentinel (the digits the pick-up was
--            computed with as its token) in their arguments replaced by the claim's token (in the
--            value of a plain SET, the record, by its digits padded with spaces to the sentinel's
--            width, with SETRANGE)
--   n        the commands of the write, each as its argument count and its arguments (what the
--            transaction would have run: the record with its TTLs, trace events, counters, the
--            running index, the next steps' messages); HINCRBY and HINCRBYFLOAT are added up over
--            the group and run once per field
--
-- Per item: 1 written (its message settled, if it names one), with e >= 9 {1} (nothing fetched) or
-- {1, id, data, claim} ({key, "run"|"busy"|"done", token, ...} as claim.lua answers, or 0: no key
-- found), or {1, id, data, claim, picked} when the pick-up was run (picked: 1, or the refusal of one
-- of its commands, whose other commands ran) instead (a write sent again that had landed before answers 1 or 2: what its first call
-- fetched is not known); 2 written, but the message was no longer this worker's (reaped while
-- paused: its body is left to its new owner); 0 the claim is not the attempt's any more, nothing
-- written; -1 no record; an error: a command of the write was refused
-- (a key of the wrong type) and its other commands ran, as in the MULTI this replaced, its claim not
-- stored as done and its message not settled; else the record's current bytes: it changed since the
-- write was computed, nothing written (read them, recompute, write again).
--
-- Nothing is rolled back when a script fails midway, so no command's refusal fails the script: the
-- other items of the group and their counters land whatever one item's command did (a counter Redis
-- refuses is left out, and logged).
--
-- One MGET reads every claim and record the group checks, where each write read its own two with a
-- GET each; a key a command of the group wrote since is read again, alone, when a later write checks
-- it (as is a key MGET answers none for: absent, or a claim hash an earlier release wrote).
local ttl = tonumber(ARGV[1])
local out = {}
local sums, order = {}, {}

local function add(kind, key, field, by)
    local id = kind .. "\0" .. key .. "\0" .. field
    if not sums[id] then
        sums[id] = 0
        order[#order + 1] = {id, kind, key, field}
    end
    sums[id] = sums[id] + by
end

local function run(from, to)
    return redis.call(unpack(ARGV, from, to))
end

local function refusal(err)
    return type(err) == "table" and err.err or tostring(err)
end

-- Whether a refusal is of the command itself (a key or value of the wrong kind, a Lua error): it fails
-- its write alone. The server's state refuses every write, the script's first one already (out of
-- memory, a read-only replica, a failing disk, too few replicas): raised with its own code, it fails
-- the group whole with nothing written, and the client handles it as such (a Sentinel client finds
-- the new master). Caught, the commands that need no memory would run and let the ones after them pass.
local function own(err)
    local message = refusal(err)
    return string.sub(message, 1, 4) == "ERR " or string.sub(message, 1, 10) == "WRONGTYPE "
        or not string.find(message, "^[A-Z]+ ")
end

-- 1, the message id settled by this worker (or none named); 2, it was no longer this worker's.
local function settled(id, acks, msgs)
    if id ~= "" and not (redis.call("srem", acks, id) == 1 and redis.call("hdel", msgs, id) == 1) then
        return 2
    end
    return 1
end

-- The group's claims and records, read at once: key -> its place in values. A key a command of the
-- group touched since is stale: read again when a later write checks it. The same walk of the
-- arguments notes where each item starts and each command's first and last argument (cfrom, cto, in
-- flat lists: item k's commands are cfirst[k] to cfirst[k + 1] - 1), which the writes below use: a
-- table per command and a second parse of the counts cost the server more than these lists.
local checked, values, stale = {}, {}, {}
local eagers = {}  -- item -> where its eager fetch's arguments start
local eager_end = {}  -- where an eager fetch's arguments start -> where the item's next ones start
local starts, cfirst, cfrom, cto = {}, {}, {}, {}
do
    local names, i, nargs = {}, 2, #ARGV
    while i <= nargs do
        local job, claim = ARGV[i], ARGV[i + 2]
        if claim ~= "" and not checked[claim] then names[#names + 1] = claim; checked[claim] = #names end
        if not checked[job] then names[#names + 1] = job; checked[job] = #names end
        starts[#starts + 1] = i
        cfirst[#cfirst + 1] = #cfrom + 1
        local e = tonumber(ARGV[i + 11])
        if e > 0 then eagers[#starts] = i + 12; eager_end[i + 12] = i + 12 + e end
        local n = tonumber(ARGV[i + 12 + e])
        i = i + 13 + e
        for _ = 1, n do
            local count = tonumber(ARGV[i])
            cfrom[#cfrom + 1] = i + 1
            cto[#cto + 1] = i + count
            i = i + 1 + count
        end
    end
    cfirst[#cfirst + 1] = #cfrom + 1
    for from = 1, #names, 1000 do  -- Lua's stack bounds how many arguments one call may take
        local got = redis.call("mget", unpack(names, from, math.min(#names, from + 999)))
        for k = 1, #got do values[from + k - 1] = got[k] end
    end
end

-- Commands whose one key is their first argument: only that one is looked up among the checked keys
-- (any other command has every argument looked up).
local SINGLE = {
    SET = true, SETEX = true, PSETEX = true, SETNX = true, GETSET = true, GETDEL = true, GETEX = true,
    APPEND = true, INCR = true, INCRBY = true, DECR = true, DECRBY = true, XADD = true, XTRIM = true,
    ZADD = true, ZREM = true, ZINCRBY = true, ZREMRANGEBYSCORE = true, ZREMRANGEBYRANK = true, SADD = true,
    SREM = true, HSET = true, HMSET = true, HSETNX = true, HDEL = true, EXPIRE = true, PEXPIRE = true,
    EXPIREAT = true, PEXPIREAT = true, PERSIST = true, RPUSH = true, LPUSH = true, RPUSHX = true,
    LPUSHX = true, LTRIM = true, LREM = true, LSET = true,
}

local function touched(name, from, to)
    if SINGLE[name] then
        if checked[ARGV[from + 1]] then stale[ARGV[from + 1]] = true end
    else
        for a = from + 1, to do
            if checked[ARGV[a]] then stale[ARGV[a]] = true end
        end
    end
end

local function server_ms()
    local t = redis.call("time")
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- SET's options that leave it a plain write of its value (no NX, XX nor GET).
local PLAIN_SET = {EX = true, PX = true, EXAT = true, PXAT = true, KEEPTTL = true}

-- The next step's pick-up (arguments from a: sentinel, m, commands), its token filled in: 1, or the
-- first refusal of its commands (the others ran, as in a MULTI). In the record a plain SET writes, the
-- token goes in place of the sentinel's digits, padded with spaces to their width (JSON whitespace):
-- written with SETRANGE over the value as sent, where building the record again as a Lua string (two
-- substrings and their concatenation, for a record of tens of kilobytes) cost the call more than
-- the rest of the pick-up. Anywhere else (its trace event) the digits replace the sentinel's.
local function pick_up(a, token)
    local sentinel, m, t = ARGV[a], tonumber(ARGV[a + 1]), string.format("%d", tonumber(token))
    local padded = #t <= #sentinel and t .. string.rep(" ", #sentinel - #t) or nil
    local i, refused = a + 2, nil
    for _ = 1, m do
        local count = tonumber(ARGV[i])
        local from, to = i + 1, i + count
        local name = string.upper(ARGV[from])
        touched(name, from, to)
        local plain = padded ~= nil and name == "SET" and count >= 3
        if plain then
            for y = from + 3, to do
                if not (PLAIN_SET[string.upper(ARGV[y])] or tonumber(ARGV[y])) then plain = false end
            end
        end
        local args, place = {}, nil
        for x = from, to do
            local v = ARGV[x]
            local at = string.find(v, sentinel, 1, true)  -- once at most (step_write.PickUp.check)
            if at and plain and x == from + 2 then
                place = at - 1
            elseif at then
                v = string.sub(v, 1, at - 1) .. t .. string.sub(v, at + #sentinel)
            end
            args[#args + 1] = v
        end
        local ok, err = pcall(redis.call, unpack(args))
        if ok and place then ok, err = pcall(redis.call, "setrange", args[2], place, padded) end
        if not ok then
            if not own(err) then error(redis.error_reply(refusal(err))) end
            refused = refused or refusal(err)
        end
        i = to + 1
    end
    return refused or 1
end

-- The wake-up token an eager fetch (arguments from a) was owed and did not take: pushed (within the
-- outbox's cap, as outbox.wake pushes one), so the message it left waiting wakes an idle consumer. A
-- command of the write as the token's push was, its refusal (a wake-up list of the wrong type) fails
-- no script: the token is left out, and logged, as a refused counter is.
local function give_owed(a)
    if ARGV[a + 8] == "1" then
        local wake = ARGV[a] .. ".wake"
        local ok, err = pcall(redis.call, "rpush", wake, 1)
        if ok then ok, err = pcall(redis.call, "ltrim", wake, -64, -1) end
        if not ok then
            if not own(err) then error(redis.error_reply(refusal(err))) end
            redis.log(redis.LOG_WARNING, "mesh step.lua: wake-up token on " .. wake .. " refused: " .. refusal(err))
        end
    end
end

-- The eager fetch of item k (arguments from a): {1} or {1, id, data, claim} (see above).
local function fetch_one(a)
    local base, acks, held, queue, stats, prefix, owner = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
        ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
    -- What it took and the claim it won, noted as it goes: a command of the fetch Redis refuses (a key
    -- of the wrong type: the acks or held set, the bodies' hash, the stats hash) fails neither the write,
    -- which landed, nor its group: the message goes back to the head of its lane, out of the acks set
    -- if this fetch put it there, the claim is given back (claim_give_back), the refusal is logged, and
    -- nothing is fetched (the consumer's own fetch meets the refusal).
    local popped, won, added = {}, nil, false
    local function fetched()
        local ids, data, fence = lanes_fetch(base, 1, true, popped)
        if not data[1] then  -- as a fetch: an id whose body is gone is dropped
            give_owed(a)
            return {1}
        end
        -- As a fetch: messages in hand are where a reaper looks.
        redis.call("sadd", held, queue)
        added = redis.call("sadd", acks, ids[1]) == 1
        if ARGV[a + 8] ~= "1" then redis.call("lpop", base .. ".wake") end
        local verdict = 0
        local key = message_key(data[1])
        if key then
            local b = claims_open(stats, tonumber(ARGV[a + 7]), ttl, server_ms(), fence)
            verdict = claim_take(b, prefix .. key, owner)
            if verdict[1] == "run" then won = {prefix .. key, b.prior, verdict[3]} end
            claims_close(b)
            table.insert(verdict, 1, key)
            if checked[prefix .. key] then stale[prefix .. key] = true end
            if a + 9 < eager_end[a] and ids[1] == ARGV[a + 9] and verdict[2] == "run" then
                return {1, ids[1], data[1], verdict, pick_up(a + 10, verdict[3])}
            end
        end
        return {1, ids[1], data[1], verdict}
    end
    local ok, out = pcall(fetched)
    if ok then return out end
    if won then claim_give_back(won[1], won[2], won[3], stats) end
    if added then redis.pcall("srem", acks, unpack(popped)) end
    lanes_give_back(base, popped)
    redis.log(redis.LOG_WARNING, "mesh step.lua: the eager fetch of " .. base .. " refused, its message put back: "
        .. refusal(out))
    if ARGV[a + 8] == "1" then pcall(give_owed, a) end
    if not own(out) then error(redis.error_reply(refusal(out))) end  -- the server's state: as before, the group fails
    return {1}
end

for k, i in ipairs(starts) do
    local job, sha, claim, owner, own_token = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
    local shared, done, result, id = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8]
    local acks, msgs = ARGV[i + 9], ARGV[i + 10]
    local answer
    local held, landed, token = true, false, 0
    if claim ~= "" then
        local state, holder, held_token
        local v = not stale[claim] and values[checked[claim]]
        if v then
            state, holder, held_token = claim_parse(v)
        else
            state, holder, held_token = claim_read(claim)
        end
        token = held_token
        if shared == "1" then
            held = state == "done"
        else
            landed = done == "1" and state == "done" and held_token == own_token
            held = (state == "claimed" and holder == owner) or landed
        end
    end
    if not held then
        answer = 0
    elseif landed then
        -- This very write landed already (sent again: its answer was lost, or its group was refused
        -- after it ran): nothing more is written, whatever its change would make of the record now.
        answer = settled(id, acks, msgs)
    else
        local current = not stale[job] and values[checked[job]]
        if not current then current = redis.call("get", job) end
        if not current then
            answer = -1
        elseif (#sha == 40 and redis.sha1hex(current) or current) ~= sha then
            answer = current
        else
            local refused = nil
            for c = cfirst[k], cfirst[k + 1] - 1 do
                local from, to = cfrom[c], cto[c]
                local name = string.upper(ARGV[from])
                local by = (name == "HINCRBY" or name == "HINCRBYFLOAT") and tonumber(ARGV[from + 3]) or nil
                if by then
                    add(name == "HINCRBY" and "i" or "f", ARGV[from + 1], ARGV[from + 2], by)
                else
                    touched(name, from, to)
                    local ok, err = pcall(run, from, to)
                    if not ok then
                        if not own(err) then error(redis.error_reply(refusal(err))) end
                        refused = refused or refusal(err)
                    end
                end
            end
            if refused then
                answer = redis.error_reply(refused)
                if eagers[k] then give_owed(eagers[k]) end
            else
                if done == "1" and claim ~= "" and shared ~= "1" then
                    redis.call("set", claim, claim_value("done", token, 0, "", result), "EX", ttl)
                    stale[claim] = true
                end
                answer = settled(id, acks, msgs)
                if answer == 1 and eagers[k] then
                    answer = fetch_one(eagers[k])
                elseif eagers[k] then
                    give_owed(eagers[k])
                end
            end
        end
    end
    out[#out + 1] = answer
end

for _, s in ipairs(order) do
    local id, kind, key, field = s[1], s[2], s[3], s[4]
    local ok, err
    if kind == "i" then
        -- As an integer's digits: a Lua number passed to a command is written in the shortest form,
        -- which some Redis releases write with an exponent (2e+08), and HINCRBY refuses that.
        ok, err = pcall(redis.call, "hincrby", key, field, string.format("%d", sums[id]))
    else
        ok, err = pcall(redis.call, "hincrbyfloat", key, field, string.format("%.17g", sums[id]))
    end
    if not ok then
        redis.log(redis.LOG_WARNING, "mesh step.lua: counter " .. key .. " " .. field .. " refused: " .. refusal(err))
    end
end
return out
