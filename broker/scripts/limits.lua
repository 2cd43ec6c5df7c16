-- A fleet-wide flow limit (rate and concurrency) of one limit and key (see broker/keys.py): every key
-- it touches shares one hash tag, so it also runs on Redis Cluster. Times come from the server's clock.
--
-- limits(keys=[state_hash, holders_zset, waiting_zset, alive_zset], args=[command, ...])
--
-- Rates are GCRA: the hash's `tat` (requests) and `ttat` (tokens) are theoretical arrival times (ms);
-- a unit costs `interval / factor` ms, where `factor` (0 < factor <= 1) is what 429s left of the
-- declared rate (AIMD: halved by a 429, at most once per `md_hold_ms`; raised by `ai_per_s` a
-- second since). A request may start while `tat - now <= burst`; a later one reserves its slot (tat
-- moves on) and is told when: it comes back then holding a permit for generation `gen` (a 429 starts
-- a new generation, voiding every permit: they were paced for the old rate).
--
--   take  holder member lease_ms max req_ms req_burst tok_ms tok_burst permit_gen permit_due wait_max_ms ai md_hold
--         tok_cost
--         -> {1, gen, factor*1e6, charged_ms, tok_charged_ms}  admitted: a slot held by `holder` (when max > 0),
--                                             a request and tok_cost tokens booked (what they moved `tat` and
--                                             `ttat` on; 0 for a permit's)
--            {0, "rate", wait_ms, gen}        its request and tokens are reserved: back in wait_ms with permit gen
--            {0, "tokens", wait_ms, gen}      (tok_cost 0) the token bucket is in debt: back in wait_ms
--            {0, "concurrency", wait_ms, gen} every slot is held, or earlier arrivals wait: back in wait_ms
--   force field unit_ms cost -> ms the bucket is ahead of now (a call made beyond a permit, or tokens
--         settled: cost may be negative, giving back what was reserved and not spent or used)
--   untake holder charged_ms tok_charged_ms -> 1: a take undone (its slot freed, what its request and tokens
--         moved tat and ttat on given back)
--   leave member -> 1 when `member` was waiting: out of the waiting list (it will not come back)
--   release holder held_ms -> 1 when the slot was held
--   renew lease_ms holder... -> slots still held (their leases run lease_ms from now)
--   rehold lease_ms holder -> 1: a slot whose lease ran out while its step ran, held again (even over max)
--   penalize pause_ms md min_factor md_hold_ms -> {factor*1e6, gen}: a 429 halves the rate (once per
--         md_hold_ms) and pauses the limit for pause_ms (its requests, and its tokens once it has spent any)
--   show [ai_per_s] -> {tat, ttat, factor*1e6, holders, waiting, gen, rejected429, now, admitted}: the factor
--         as it stands now (climbed back by ai_per_s a second since it was last written)

local state, holders, waiting, alive = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local command = ARGV[1]
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A waiter not back this long after it was due left (its message ended elsewhere): pruned.
local WAITER_GRACE_MS = 10000
-- How many times per usual hold of a slot a waiter next in line looks again (see take).
local HEAD_LOOKS, HEAD_MIN_MS = 10, 100

local function num(field, default)
    return tonumber(redis.call("hget", state, field)) or default
end

-- The factor now: what the last 429 left of it, raised additively since.
local function factor_now(ai_per_s)
    local f = num("factor", 1)
    if f < 1 and ai_per_s > 0 then
        local since = num("factor_at", now)
        f = math.min(1, f + ai_per_s * math.max(0, now - since) / 1000)
        redis.call("hset", state, "factor", f, "factor_at", now)
    end
    return f
end

-- A rate changed since its bucket was booked (`mesh limits set`, a reset, a new declaration): what is
-- booked ahead of now is paced again at the new rate, so raising a rate lets new requests in as soon as
-- the new rate would have (not behind a backlog booked at the old one) and lowering it holds them back
-- as long. `unit`: a unit's cost (ms) at the declared or overridden rate; `unit_field` records it.
local function repace(field, unit_field, unit)
    if not unit or unit <= 0 then return end
    local was = tonumber(redis.call("hget", state, unit_field))
    if was == unit then return end
    if was and was > 0 then
        local ahead = num(field, 0) - now
        if ahead > 0 then redis.call("hset", state, field, now + ahead * unit / was) end
    end
    redis.call("hset", state, unit_field, unit)
end

local function prune()
    redis.call("zremrangebyscore", holders, "-inf", now)
    local gone = redis.call("zrangebyscore", alive, "-inf", now)
    if #gone > 0 then
        redis.call("zrem", alive, unpack(gone))
        redis.call("zrem", waiting, unpack(gone))
    end
end

local function keep(ms)
    -- The limit's keys outlive their last use by a day: a limit unused that long starts afresh.
    redis.call("pexpire", state, 86400000)
    for _, k in ipairs({holders, waiting, alive}) do
        redis.call("pexpire", k, math.max(ms, 86400000))  -- a key that does not exist is left alone
    end
end

if command == "take" then
    local holder, member = ARGV[2], ARGV[3]
    local lease_ms, max = tonumber(ARGV[4]), tonumber(ARGV[5])
    local req_ms, req_burst = tonumber(ARGV[6]), tonumber(ARGV[7])
    local tok_ms, tok_burst = tonumber(ARGV[8]), tonumber(ARGV[9])
    local permit_gen, permit_due = tonumber(ARGV[10]), tonumber(ARGV[11])
    local wait_max, ai = tonumber(ARGV[12]), tonumber(ARGV[13])
    local tok_cost = tonumber(ARGV[15]) or 0
    local f = factor_now(ai)
    repace("tat", "req_unit", req_ms)
    repace("ttat", "tok_unit", tok_ms)
    local gen = num("gen", 0)
    local hold_ms = num("hold_ms", 200)
    -- Concurrency: a free slot, and no earlier arrival waiting for one.
    if max > 0 then
        prune()
        if redis.call("zscore", holders, holder) then
            redis.call("zadd", holders, now + lease_ms, holder)
            return {1, gen, math.floor(f * 1e6), "0"}
        end
        local held = redis.call("zcard", holders)
        local free = max - held
        local ahead = 0
        local rank = redis.call("zrank", waiting, member)
        if rank then ahead = rank else ahead = redis.call("zcard", waiting) end
        if free <= 0 or ahead >= free then
            if not rank then
                -- In arrival order: microseconds, one apart at least, so waiters arriving within one
                -- millisecond keep theirs (not their keys' order); written as integers, exact to 2^53.
                local at = math.max(now * 1000, (tonumber(redis.call("hget", state, "waiter_at")) or 0) + 1)
                local score = string.format("%.0f", at)
                redis.call("hset", state, "waiter_at", score)
                redis.call("zadd", waiting, score, member)
            end
            local position = (rank or ahead) + 1
            -- Back when the slots ahead of it have turned over, by how long a slot is usually held. A
            -- waiter next in line (one of the first `max`) looks again HEAD_LOOKS times per usual hold:
            -- a slot may free long before slots usually do, and no message can be woken early (the
            -- deferred copy sits in a worker's memory until it is due), so capacity sits idle at most
            -- a tenth of a usual hold (or HEAD_MIN_MS, so short holds are not polled for faster than
            -- 10 times a second); the waiters behind it look once per round of turnovers.
            local rounds = math.ceil(position / max)
            local wait = hold_ms * rounds
            if rounds == 1 then wait = math.max(math.min(hold_ms, HEAD_MIN_MS), hold_ms / HEAD_LOOKS) end
            wait = math.max(20, math.min(math.floor(wait), wait_max))
            redis.call("zadd", alive, now + wait + WAITER_GRACE_MS, member)
            keep(lease_ms)
            return {0, "concurrency", wait, gen}
        end
    end
    -- Requests, and the tokens the message's model call is expected to spend (tok_cost of them), booked
    -- together: admitted within the bursts, else both reserved (the message is back when the later of
    -- them is due, with a permit: the reservation is its). Booked on admission, not only when the call
    -- is made, so a burst of messages cannot all start before any call has reserved its tokens.
    local charged, tok_charged = 0, 0
    if not (permit_gen == gen and permit_due > 0) then
        local wait, tat, ttat = 0, nil, nil
        if req_ms > 0 then
            charged = req_ms / f
            tat = math.max(num("tat", 0), now)
            if tat - now > req_burst then wait = tat - req_burst - now end
        end
        if tok_ms > 0 and tok_cost > 0 then
            tok_charged = tok_cost * tok_ms / f
            ttat = math.max(num("ttat", 0), now)
            if ttat - now > tok_burst then wait = math.max(wait, ttat - tok_burst - now) end
        elseif tok_ms > 0 and num("ttat", 0) - now > tok_burst then
            return {0, "tokens", math.floor(num("ttat", 0) - tok_burst - now), gen}
        end
        if tat then redis.call("hset", state, "tat", tat + charged) end
        if ttat then redis.call("hset", state, "ttat", ttat + tok_charged) end
        if wait > 0 then
            redis.call("hincrby", state, "reserved", 1)
            keep(lease_ms)
            return {0, "rate", math.floor(wait), gen}
        end
    end
    if max > 0 then
        redis.call("zadd", holders, now + lease_ms, holder)
        redis.call("zrem", waiting, member)
        redis.call("zrem", alive, member)
    end
    redis.call("hincrby", state, "admitted", 1)
    keep(lease_ms)
    return {1, gen, math.floor(f * 1e6), tostring(charged), tostring(tok_charged)}
end

if command == "force" then
    local field, unit_ms, cost = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
    local f = num("factor", 1)
    local tat = num(field, 0)
    if cost > 0 then tat = math.max(tat, now) end
    tat = tat + cost * unit_ms / f
    redis.call("hset", state, field, tat)
    keep(0)
    return math.floor(tat - now)
end

if command == "untake" then
    -- charged_ms: what the take moved the request schedule on (0 for a permit's admission, which took
    -- its request when it reserved it), given back as it was taken whatever the factor is now.
    local holder, charged_ms, tok_charged_ms = ARGV[2], tonumber(ARGV[3]) or 0, tonumber(ARGV[4]) or 0
    redis.call("zrem", holders, holder)
    if charged_ms > 0 then
        redis.call("hset", state, "tat", num("tat", 0) - charged_ms)
    end
    if tok_charged_ms > 0 then
        redis.call("hset", state, "ttat", num("ttat", 0) - tok_charged_ms)
    end
    redis.call("hincrby", state, "admitted", -1)
    return 1
end

if command == "leave" then
    local member = ARGV[2]
    redis.call("zrem", alive, member)
    return redis.call("zrem", waiting, member)
end

if command == "release" then
    local holder, held_ms = ARGV[2], tonumber(ARGV[3])
    local was = redis.call("zrem", holders, holder)
    if was == 1 and held_ms and held_ms > 0 then
        -- How long a slot is held, on average: how long a waiter is told to wait per place ahead of it.
        redis.call("hset", state, "hold_ms", 0.8 * num("hold_ms", held_ms) + 0.2 * held_ms)
    end
    return was
end

if command == "renew" then
    local lease_ms = tonumber(ARGV[2])
    local n = 0
    for i = 3, #ARGV do
        n = n + redis.call("zadd", holders, "XX", "CH", now + lease_ms, ARGV[i])
    end
    return n
end

if command == "rehold" then
    -- A slot whose lease ran out while its step still runs: counted again, over the max if need be.
    redis.call("zadd", holders, now + tonumber(ARGV[2]), ARGV[3])
    keep(tonumber(ARGV[2]))
    return 1
end

if command == "penalize" then
    local pause_ms, md, min_factor, md_hold = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
        tonumber(ARGV[5])
    local f = num("factor", 1)
    local gen = num("gen", 0)
    redis.call("hincrby", state, "rejected", 1)
    if now - num("decreased_at", 0) >= md_hold then
        f = math.max(min_factor, f * md)
        gen = gen + 1
        redis.call("hset", state, "factor", f, "factor_at", now, "decreased_at", now, "gen", gen)
        -- The permits handed out were paced for the old rate: void, so the pacing restarts from now.
        redis.call("hset", state, "tat", now + pause_ms)
    elseif pause_ms > 0 then
        redis.call("hset", state, "tat", math.max(num("tat", 0), now + pause_ms))
    end
    -- A token rate (a model's 429): no call is admitted until the pause ends either.
    if pause_ms > 0 and redis.call("hexists", state, "ttat") == 1 then
        redis.call("hset", state, "ttat", math.max(num("ttat", 0), now + pause_ms))
    end
    keep(0)
    return {math.floor(f * 1e6), gen}
end

if command == "show" then
    prune()
    -- The factor as a take would find it now (raised by ai_per_s a second since the last 429 or take).
    local f, ai = num("factor", 1), tonumber(ARGV[2]) or 0
    if f < 1 and ai > 0 then
        f = math.min(1, f + ai * math.max(0, now - num("factor_at", now)) / 1000)
    end
    return {tostring(num("tat", 0)), tostring(num("ttat", 0)), math.floor(f * 1e6),
            redis.call("zcard", holders), redis.call("zcard", waiting), num("gen", 0), num("rejected", 0), now,
            num("admitted", 0)}
end

return redis.error_reply("unknown limits command " .. tostring(command))
