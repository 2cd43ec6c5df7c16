-- An agent queue's lanes: where a ready message waits, by its priority and its flow key (see
-- broker/keys.py for the layout, broker/lanes.py for the Python half). Prepended to the scripts that
-- push or fetch ready messages (enqueue.lua, settle.lua).
--
-- A message's lane comes from its envelope, read from the encoded message without decoding it:
-- ``"priority":"high"|"normal"|"low"`` and ``"flow_key":"..."``, both written before the envelope's
-- ``"payload":`` (every field before it is a scalar, so the first match is the envelope's own).
--
--   {ns}:{queue}                  normal priority, no flow key: the list the queue always had
--   {ns}:{queue}.high / .low      high / low priority, no flow key
--   {ns}:{queue}.flow:{p}:{key}   priority p, flow key {key} (as JSON escapes it)
--   {ns}:{queue}.flows:{p}        zset flow key -> round: the flows of priority p with ready work,
--                                 served round robin (lowest round first); a flow new to the zset
--                                 joins at round 0, so its first message goes next (a sparse
--                                 tenant is never stuck behind another's backlog), then it takes
--                                 its turn at the end of the current round. The member "" stands
--                                 for the level's list without a flow key, added by the fetch
--                                 while both have work.
--   {ns}:{queue}.sched            hash: credit:{p} (fetches owed to a lower level), round:{p}, and
--                                 n:{p}, the messages waiting in priority p's flows (so counting
--                                 them never walks every tenant)
--   field lanes:{queue} of {ns}:stats: set while the queue's other lanes may have work (by every
--                                 push there; cleared by the fetch that finds them empty): a fetch
--                                 reads it with the fencing counter it reads anyway (claim_lib.lua)
--
-- A fetch serves the highest level with work, except that every lower level with work earns a
-- credit per message fetched and is served when it holds LANE_SHARE of them: each waiting lower
-- level gets one fetch in LANE_SHARE, whatever waits above it. A queue holding only normal
-- messages without a flow key is fetched as it always was, with the same commands (and an EXISTS
-- of its other lanes when it finds its list empty).
-- Delay queues ({queue}.DQ) have one lane: dramatiq orders them by due time.

local LANE_LEVELS = {"high", "normal", "low"}
local LANE_SHARE = 8

-- base: a queue's key, {ns}:{queue}
local function lane_is_delay(base)
    return string.sub(base, -3) == ".DQ"
end

-- The JSON string starting at data[from] (just past its opening quote), as written (escaped).
local function lane_json_text(data, from)
    local i = from
    while true do
        local q = string.find(data, '"', i, true)
        if not q then return nil end
        local k, slashes = q - 1, 0
        while string.byte(data, k) == 92 do slashes, k = slashes + 1, k - 1 end
        if slashes % 2 == 0 then return string.sub(data, from, q - 1) end
        i = q + 1
    end
end

-- The priority and flow key (nil: none) of an encoded message.
local function lane_of(data)
    local stop = string.find(data, '"payload":', 1, true)
    if not stop then return "normal", nil end
    local head = string.sub(data, 1, stop) -- the searches below never scan the payload
    local level = "normal"
    local _, e = string.find(head, '"priority":"', 1, true)
    if e then
        local p = string.match(head, '^(%a+)"', e + 1)
        if p == "high" or p == "low" then level = p end
    end
    local flow = nil
    local _, f = string.find(head, '"flow_key":"', 1, true)
    if f then
        flow = lane_json_text(head, f + 1)
        if flow == "" then flow = nil end
    end
    return level, flow
end

local function lane_plain(base, level)
    if level == "normal" then return base end
    return base .. "." .. level
end

local function lane_ring(base, level)
    return base .. ".flows:" .. level
end

local function lane_flow(base, level, flow)
    return base .. ".flow:" .. level .. ":" .. flow
end

-- The stats hash of the queue at base, and its field saying other lanes may have work.
local function lanes_mark(base)
    -- base is "{tag}:queue", the tag being "{ns}" or a shard's "{ns:N}" (which holds a ':' itself)
    local ns, queue = string.match(base, "^(%b{}):(.*)$")
    return ns .. ":stats", "lanes:" .. queue
end

-- Puts message id (its encoded body: data) in its lane of the queue at base ({ns}:{queue}): at the
-- tail, or at the head when it goes back (a requeue, a recovery).
local function lane_push(base, id, data, head)
    local op = head and "lpush" or "rpush"
    if lane_is_delay(base) then
        redis.call(op, base, id)
        return
    end
    local level, flow = lane_of(data)
    if flow then
        redis.call(op, lane_flow(base, level, flow), id)
        redis.call("zadd", lane_ring(base, level), "NX", 0, flow)
        redis.call("hincrby", base .. ".sched", "n:" .. level, 1)
    else
        redis.call(op, lane_plain(base, level), id)
    end
    if flow or level ~= "normal" then
        local stats, field = lanes_mark(base)
        redis.call("hset", stats, field, 1)
    end
end

-- Whether the queue at base has work anywhere but its plain normal list.
local function lanes_in_use(base)
    return redis.call("exists", base .. ".high", base .. ".low", lane_ring(base, "high"),
                      lane_ring(base, "normal"), lane_ring(base, "low")) > 0
end

-- Takes up to n ids from the lanes of the queue at base, in lane order (see above); each id taken is
-- noted in popped too (when given) the moment it leaves its lane.
local function lanes_pop(base, n, popped)
    local sched = base .. ".sched"
    local st = redis.call("hmget", sched, "credit:normal", "credit:low", "round:high", "round:normal", "round:low",
                          "n:high", "n:normal", "n:low")
    if popped then popped.sched = {sched, st} end  -- the turns as they were, should a refusal put them back
    local credit = {normal = tonumber(st[1]) or 0, low = tonumber(st[2]) or 0}
    local round = {high = tonumber(st[3]) or 0, normal = tonumber(st[4]) or 0, low = tonumber(st[5]) or 0}
    local waiting = {high = tonumber(st[6]) or 0, normal = tonumber(st[7]) or 0, low = tonumber(st[8]) or 0}
    local plain_n, ring_n, joined = {}, {}, {}
    for _, level in ipairs(LANE_LEVELS) do
        plain_n[level] = redis.call("llen", lane_plain(base, level))
        ring_n[level] = redis.call("zcard", lane_ring(base, level))
    end

    local function take(level)
        local ring = lane_ring(base, level)
        if ring_n[level] == 0 then
            plain_n[level] = plain_n[level] - 1
            local id = redis.call("lpop", lane_plain(base, level))
            if id and popped then popped[#popped + 1] = id end
            return id
        end
        if plain_n[level] > 0 and not joined[level] then
            -- the level's list without a flow key takes its turns like one more flow
            ring_n[level] = ring_n[level] + redis.call("zadd", ring, "NX", 0, "")
            joined[level] = true
        end
        local top = redis.call("zpopmin", ring)
        if not top[1] then
            ring_n[level] = 0
            return nil
        end
        local member, score = top[1], tonumber(top[2])
        if popped then  -- its place in its ring as it was, should a refusal put it back
            popped.rings = popped.rings or {}
            popped.rings[#popped.rings + 1] = {ring, member, top[2]}
        end
        if score > round[level] then round[level] = score end
        local list = member == "" and lane_plain(base, level) or lane_flow(base, level, member)
        local id = redis.call("lpop", list)
        if id and popped then popped[#popped + 1] = id end
        local left = redis.call("llen", list)
        if member == "" then
            plain_n[level] = left
        elseif id then
            waiting[level] = math.max(0, waiting[level] - 1)
        end
        if left > 0 then
            redis.call("zadd", ring, round[level] + 1, member)
        else
            ring_n[level] = ring_n[level] - 1
        end
        return id
    end

    local ids = {}
    for _ = 1, n * 2 do -- bounded: a lane found empty costs a turn
        if #ids >= n then break end
        local first = nil
        for _, level in ipairs(LANE_LEVELS) do
            if plain_n[level] > 0 or ring_n[level] > 0 then first = first or level
            elseif level ~= "high" then credit[level] = 0 end
        end
        if not first then break end
        if first ~= "high" then credit[first] = 0 end
        local chosen = first
        for _, level in ipairs({"low", "normal"}) do
            if level ~= first and (plain_n[level] > 0 or ring_n[level] > 0) then
                credit[level] = credit[level] + 1
            end
        end
        for _, level in ipairs({"low", "normal"}) do
            if level ~= first and credit[level] >= LANE_SHARE then
                chosen = level
                credit[level] = credit[level] - LANE_SHARE
                break
            end
        end
        local id = take(chosen)
        if id then ids[#ids + 1] = id end
    end
    for _, level in ipairs(LANE_LEVELS) do
        if ring_n[level] == 0 then waiting[level] = 0 end -- no flow has work: none waits, whatever was counted
    end
    redis.call("hset", sched, "credit:normal", credit.normal, "credit:low", credit.low,
               "round:high", round.high, "round:normal", round.normal, "round:low", round.low,
               "n:high", waiting.high, "n:normal", waiting.normal, "n:low", waiting.low)
    local stats, field = lanes_mark(base)
    if plain_n.high + plain_n.low + ring_n.high + ring_n.normal + ring_n.low == 0 then
        redis.call("hdel", stats, field)
    else
        redis.call("hset", stats, field, 1)
    end
    return ids
end

-- Up to n ids from the queue at base, in lane order, their bodies (HMGET's answer: false for a
-- body gone) and, when asked to (claims: true), the stats hash's "fence" field as read (false:
-- absent; nil: not read). A queue whose other lanes are empty: one LPOP, one HMGET of the stats
-- hash (the fence a fetch that claims reads anyway) and one HMGET of the bodies. popped (a table,
-- when given): every id taken from the queue is noted there as it is taken, so that a fetch failing
-- after it (a command of the fetch refused: a key of the wrong type) can put them back
-- (lanes_give_back) rather than leave them in no list at all.
local function lanes_fetch(base, n, claims, popped)
    popped = popped or {}
    local ids = redis.call("lpop", base, n)
    if ids then
        for _, id in ipairs(ids) do popped[#popped + 1] = id end
    end
    local msgs, fence = base .. ".msgs", nil
    if lane_is_delay(base) then
        if not ids then return {}, {}, nil end
        return ids, redis.call("hmget", msgs, unpack(ids)), nil
    end
    if ids then
        local in_use
        if claims then
            local stats, field = lanes_mark(base)
            local got = redis.call("hmget", stats, "fence", field)
            fence, in_use = got[1], got[2]
        else
            in_use = lanes_in_use(base)
        end
        if not in_use then return ids, redis.call("hmget", msgs, unpack(ids)), fence end
        local back = {}
        for i = #ids, 1, -1 do back[#back + 1] = ids[i] end
        redis.call("lpush", base, unpack(back)) -- in order: another lane may come first
        for _ = 1, #ids do popped[#popped] = nil end -- back where they were
    elseif not lanes_in_use(base) then
        return {}, {}, nil
    end
    ids = lanes_pop(base, n, popped)
    if #ids == 0 then return ids, {}, fence end
    return ids, redis.call("hmget", msgs, unpack(ids)), fence
end

-- The fields of a queue's .sched hash, in the order lanes_pop reads them.
local LANE_SCHED = {"credit:normal", "credit:low", "round:high", "round:normal", "round:low", "n:high", "n:normal",
                    "n:low"}

-- Puts back the ids a fetch took from the queue at base (popped, in the order taken) when the fetch
-- failed after taking them: at the head of their own lanes where their bodies can be read (else of the
-- queue's plain list), in that order, with a wake-up token; and the lanes' turns as the fetch found
-- them: every flow it took out of its ring (ZPOPMIN) back in it at its score then, and the .sched
-- hash's credits, rounds and counts of waiting flow messages as it read them, so a refused fetch
-- spends nobody's turn. An id goes to one list only: once its lane's LPUSH ran, the rest (its ring,
-- the stats hash's lanes mark) is done as far as Redis lets it. Nothing here fails the caller, which
-- then fails with the refusal that stopped it.
local function lanes_give_back(base, popped)
    for i = #popped, 1, -1 do
        local id = popped[i]
        local read, data = pcall(redis.call, "hget", base .. ".msgs", id)
        local list, level, flow = base, "normal", nil
        if read and data and not lane_is_delay(base) then
            level, flow = lane_of(data)
            list = flow and lane_flow(base, level, flow) or lane_plain(base, level)
        end
        local put = redis.pcall("lpush", list, id)
        if type(put) == "table" and put.err then
            redis.pcall("lpush", base, id)
        elseif list ~= base then
            if flow then redis.pcall("zadd", lane_ring(base, level), "NX", 0, flow) end
            local stats, field = lanes_mark(base)
            redis.pcall("hset", stats, field, 1)
        end
    end
    for _, r in ipairs(popped.rings or {}) do
        redis.pcall("zadd", r[1], r[3], r[2])
    end
    if popped.sched then
        local sched, st = popped.sched[1], popped.sched[2]
        for k, field in ipairs(LANE_SCHED) do
            if st[k] then redis.pcall("hset", sched, field, st[k]) else redis.pcall("hdel", sched, field) end
        end
    end
    if #popped > 0 then
        redis.pcall("rpush", base .. ".wake", 1)
        redis.pcall("ltrim", base .. ".wake", -64, -1)
    end
end
