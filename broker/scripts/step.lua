-- A group of steps' job-record writes (broker/step_write.py), each a compare-and-set fenced by its
-- claim: one call writes what a WATCH/MULTI transaction per step wrote, with no WATCH, no read
-- round trip and no MULTI. Runs after claim_lib.lua.
--
-- step(keys=[], args=[ttl_s, item...]), each item being the arguments
--
--   job, sha, claim, owner, token, shared, done, result, id, acks, msgs, n, (count, command...) x n
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
--   n        the commands of the write, each as its argument count and its arguments (what the
--            transaction would have run: the record with its TTLs, trace events, counters, the
--            running index, the next steps' messages); HINCRBY and HINCRBYFLOAT are added up over
--            the group and run once per field
--
-- Per item: 1 written (its message settled, if it names one); 2 written, but the message was no
-- longer this worker's (reaped while paused: its body is left to its new owner); 0 the claim is not
-- the attempt's any more, nothing written; -1 no record; an error: a command of the write was refused
-- (a key of the wrong type) and its other commands ran, as in the MULTI this replaced, its claim not
-- stored as done and its message not settled; else the record's current bytes: it changed since the
-- write was computed, nothing written (read them, recompute, write again).
--
-- Nothing is rolled back when a script fails midway, so no command's refusal fails the script: the
-- other items of the group and their counters land whatever one item's command did (a counter Redis
-- refuses is left out, and logged).
--
-- The group's commands, fewer than one per write each (docs/performance.md): one MGET reads every
-- claim and record the group checks (a key a command of the group wrote since is read again, alone;
-- a key MGET answers none for, absent or a claim hash an earlier release wrote, too). The writes'
-- ZADD, ZREM, SREM, HDEL and SADD wait, and go as one command per key with every write's members,
-- before anything else touches that key, and at the end; each write's claim stored as done and its
-- message settled wait with them, in the writes' order: so a write refused a member of such a command
-- (its part is then sent alone to find whose) still stores and settles nothing. Commands on other
-- keys commute with the ones waiting, and a key that is checked, written or waited on by a later
-- write has the waiting commands run first: what lands is what the writes one after another landed.

local ttl = tonumber(ARGV[1])
local out = {}
local sums, order = {}, {}
local upper, sub = string.upper, string.sub

local function add(kind, key, field, by)
    local id = kind .. "\0" .. key .. "\0" .. field
    if not sums[id] then
        sums[id] = 0
        order[#order + 1] = {id, kind, key, field}
    end
    sums[id] = sums[id] + by
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
    return sub(message, 1, 4) == "ERR " or sub(message, 1, 10) == "WRONGTYPE "
        or not string.find(message, "^[A-Z]+ ")
end

-- 1, the message id settled by this worker (or none named); 2, it was no longer this worker's.
local function settled(id, acks, msgs)
    if id ~= "" and not (redis.call("srem", acks, id) == 1 and redis.call("hdel", msgs, id) == 1) then
        return 2
    end
    return 1
end

-- The writes, read from ARGV first: their claims and records go in one MGET.
local items = {}
local i = 2
while i <= #ARGV do
    local n = tonumber(ARGV[i + 11])
    local item = {i, {}}
    i = i + 12
    for c = 1, n do
        local count = tonumber(ARGV[i])
        item[2][c] = i + 1
        item[2][c + n] = i + count
        i = i + 1 + count
    end
    items[#items + 1] = item
end

local checked, values = {}, {}  -- key -> its place in values: the MGET's answer
do
    local names = {}
    for _, item in ipairs(items) do
        local at = item[1]
        local claim, job = ARGV[at + 2], ARGV[at]
        if claim ~= "" and not checked[claim] then names[#names + 1] = claim; checked[claim] = #names end
        if not checked[job] then names[#names + 1] = job; checked[job] = #names end
    end
    for from = 1, #names, 1000 do  -- Lua's stack bounds how many arguments one call may take
        local got = redis.call("mget", unpack(names, from, math.min(#names, from + 999)))
        for k = 1, #got do values[from + k - 1] = got[k] end
    end
end
local stale = {}  -- checked keys a command of the group touched since the MGET: read again

local BATCHED = {ZADD = true, ZREM = true, SREM = true, HDEL = true, SADD = true}
local ZADD_FLAGS = {NX = true, XX = true, GT = true, LT = true, CH = true}
local pending, finishing = {}, {}  -- key -> true: a command waiting touches it; a finish does
local batches, open = {}, {}  -- the waiting commands in the order opened; key -> {by = {kind -> command},
-- members = {member -> kind}}: the ones open on it
local finishes = {}  -- writes that passed their checks, in order, waiting to store done and settle
local refused = {}  -- write's place -> {command's place, refusal}: its first refused command
local fatal = nil  -- a refusal of the server's state, raised once the waiting commands ran

local function refuse(place, c, err)
    if not own(err) then
        fatal = fatal or err
    end
    local r = refused[place]
    if not r or c < r[1] then refused[place] = {c, refusal(err)} end
end

local function flush()
    local bs, fs = batches, finishes
    batches, open, finishes, pending, finishing = {}, {}, {}, {}, {}
    for _, b in ipairs(bs) do
        local ok, err = pcall(redis.call, unpack(b.args))
        if checked[b.key] then stale[b.key] = true end
        if not ok then
            -- Whose part was refused: each goes alone (a command refused changed nothing).
            for _, part in ipairs(b.parts) do
                local args = {}
                for k = 1, b.head do args[k] = b.args[k] end
                for a = part[3], part[4] do args[#args + 1] = ARGV[a] end
                local ok2, err2 = pcall(redis.call, unpack(args))
                if not ok2 then refuse(part[1], part[2], err2) end
            end
        end
    end
    for _, f in ipairs(fs) do
        local place, at, store = f[1], f[2], f[3]
        local r = refused[place]
        if r then
            out[place] = redis.error_reply(r[2])
        else
            local claim = ARGV[at + 2]
            if store then
                redis.call("set", claim, claim_value("done", f[4], 0, "", ARGV[at + 7]), "EX", ttl)
                if checked[claim] then stale[claim] = true end
            end
            out[place] = settled(ARGV[at + 8], ARGV[at + 9], ARGV[at + 10])
        end
    end
end

-- A finish waits on key (it runs after every command waiting now: they came first).
local function finish_on(key)
    pending[key], finishing[key] = true, true
end

-- Command c of write place, ARGV[from..to], held back into its key's waiting command when it is one
-- of BATCHED (true), else false.
local function held(place, c, from, to)
    local name = upper(ARGV[from])
    if not BATCHED[name] or to < from + 2 then return false end
    local key, first, step = ARGV[from + 1], from + 2, 1
    local id = name
    if name == "ZADD" then
        while first <= to and ZADD_FLAGS[upper(ARGV[first])] do
            id = id .. "\0" .. upper(ARGV[first])
            first = first + 1
        end
        if first > to or (to - first + 1) % 2 ~= 0 then return false end
        step = 2
    end
    -- Commands of another kind wait on the key (a ZADD and a ZREM of a write's running index): they
    -- commute with this one unless they name one of its members, which runs them first.
    local on, names = open[key], nil
    if finishing[key] then
        flush()
    elseif on then
        names = on.members
        for a = first + step - 1, to, step do
            local kind = names[ARGV[a]]
            if kind and kind ~= id then flush(); break end
        end
    end
    on = open[key]
    if not on then
        on = {by = {}, members = {}}
        open[key] = on
        pending[key] = true
    end
    local b = on.by[id]
    if not b then
        b = {key = key, args = {}, parts = {}}
        for a = from, first - 1 do b.args[#b.args + 1] = ARGV[a] end
        b.head = #b.args
        batches[#batches + 1] = b
        on.by[id] = b
    end
    for a = first, to do b.args[#b.args + 1] = ARGV[a] end
    for a = first + step - 1, to, step do on.members[ARGV[a]] = id end
    b.parts[#b.parts + 1] = {place, c, first, to}
    return true
end

for place, item in ipairs(items) do
    local at, ranges = item[1], item[2]
    local job, sha, claim, owner, own_token = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], tonumber(ARGV[at + 4])
    local shared, done, id = ARGV[at + 5], ARGV[at + 6], ARGV[at + 8]
    local held_now, landed, token = true, false, 0
    if claim ~= "" then
        if pending[claim] then flush() end
        local state, holder, held_token
        local v = not stale[claim] and values[checked[claim]]
        if v then
            state, holder, held_token = claim_parse(v)
        else
            state, holder, held_token = claim_read(claim)
        end
        token = held_token
        if shared == "1" then
            held_now = state == "done"
        else
            landed = done == "1" and state == "done" and held_token == own_token
            held_now = (state == "claimed" and holder == owner) or landed
        end
    end
    if not held_now then
        out[place] = 0
    elseif landed then
        -- This very write landed already (sent again: its answer was lost, or its group was refused
        -- after it ran): nothing more is written, whatever its change would make of the record now.
        if id ~= "" then
            finish_on(ARGV[at + 9]); finish_on(ARGV[at + 10])
        end
        finishes[#finishes + 1] = {place, at, false}
    else
        if pending[job] then flush() end
        local current = not stale[job] and values[checked[job]]
        if not current then current = redis.call("get", job) end
        if not current then
            out[place] = -1
        elseif (#sha == 40 and redis.sha1hex(current) or current) ~= sha then
            out[place] = current
        else
            local n = #ranges / 2
            for c = 1, n do
                local from, to = ranges[c], ranges[c + n]
                local name = upper(ARGV[from])
                local by = (name == "HINCRBY" or name == "HINCRBYFLOAT") and tonumber(ARGV[from + 3]) or nil
                if by then
                    add(name == "HINCRBY" and "i" or "f", ARGV[from + 1], ARGV[from + 2], by)
                elseif not held(place, c, from, to) then
                    for a = from + 1, to do
                        local key = ARGV[a]
                        if pending[key] then flush() end
                        if checked[key] then stale[key] = true end
                    end
                    local ok, err = pcall(redis.call, unpack(ARGV, from, to))
                    if not ok then refuse(place, c, err) end
                end
                if fatal then break end
            end
            local store = done == "1" and claim ~= "" and shared ~= "1"
            if store then finish_on(claim) end
            if id ~= "" then finish_on(ARGV[at + 9]); finish_on(ARGV[at + 10]) end
            finishes[#finishes + 1] = {place, at, store, token}
        end
    end
    if fatal then break end
end
flush()
if fatal then error(redis.error_reply(refusal(fatal))) end

for _, s in ipairs(order) do
    local key_id, kind, key, field = s[1], s[2], s[3], s[4]
    local ok, err
    if kind == "i" then
        -- As an integer's digits: a Lua number passed to a command is written in the shortest form,
        -- which some Redis releases write with an exponent (2e+08), and HINCRBY refuses that.
        ok, err = pcall(redis.call, "hincrby", key, field, string.format("%d", sums[key_id]))
    else
        ok, err = pcall(redis.call, "hincrbyfloat", key, field, string.format("%.17g", sums[key_id]))
    end
    if not ok then
        redis.log(redis.LOG_WARNING, "mesh step.lua: counter " .. key .. " " .. field .. " refused: " .. refusal(err))
    end
end
return out
