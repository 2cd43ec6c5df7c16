-- The claim on a message key, read and written in one place; prepended to every script that
-- touches claims (claim.lua, settle.lua, step.lua, retention.lua; see broker/claims.py for Python readers).
--
-- A claim is one string key, {ns}:claim:{key} = "state|token|expires_ms|owner|result", kept for
-- the dedup window (EX ttl): state claimed|free|done; token, the fencing token; expires_ms, the end
-- of a claimed lease on the Redis server's clock; owner, the attempt holding it; result, what a
-- done key answers duplicates with. One SET writes it and one GET reads it, where a hash took an
-- HSET, an EXPIRE and an HMGET. A hash left by an earlier release of the mesh is still read (and
-- replaced by the string at its next write).

-- A claim's string as read (false: no key): state, owner, token, expires, result.
local function claim_parse(v)
    if not v then return false, false, 0, 0, false end
    local state, token, expires, owner, result = string.match(v, "^(%a+)|(%d*)|(%d*)|([^|]*)|(.*)$")
    return state, owner, tonumber(token) or 0, tonumber(expires) or 0, result
end

local function claim_read(key)
    local v = redis.pcall("get", key)
    if type(v) == "table" and v.err then
        local h = redis.call("hmget", key, "state", "owner", "token", "expires", "result")
        return h[1], h[2], tonumber(h[3]) or 0, tonumber(h[4]) or 0, h[5]
    end
    return claim_parse(v)
end

local function claim_value(state, token, expires, owner, result)
    return state .. "|" .. token .. "|" .. expires .. "|" .. (owner or "") .. "|" .. (result or "")
end

-- Stores the attempt's result as done; 1 done (or already done), 0 the lease was lost to another owner.
-- A done claim keeps no owner: nothing asks a done key who finished it, and the dedup window is long.
-- The result is already bounded by the caller (broker/claim_results.py: MESH_CLAIM_RESULT_BYTES), but for
-- a key shared across shards, kept whole until its job's record holds it (broker/shared_claims.py).
local function claim_done(key, owner, result, ttl_s)
    local state, holder, token = claim_read(key)
    if state == "done" then return 1 end
    if state ~= "claimed" or holder ~= owner then return 0 end
    redis.call("set", key, claim_value("done", token, 0, "", result), "EX", ttl_s)
    return 1
end

-- {ns}:kills:{key}: how many owners of the claim at {ns}:claim:{key} died holding it (their lease
-- ran out and another attempt took it over): a message that keeps taking workers down is poison.
local function kills_key(key)
    return (string.gsub(key, ":claim:", ":kills:", 1))
end

-- Frees a claim this owner still holds (the token is kept); 1 freed, 0 not ours. An attempt that
-- ended and let go (a failure, a dead letter) ends the run of deaths: its kill count is cleared.
local function claim_free(key, owner)
    local state, holder, token = claim_read(key)
    if state ~= "claimed" or holder ~= owner then return 0 end
    redis.call("set", key, claim_value("free", token, 0, "", ""), "KEEPTTL")
    redis.call("del", kills_key(key))
    return 1
end

-- A claim a fetch won (claim_take), given back because the fetch was refused after it (lanes_give_back
-- puts its message back): written back as claim_take found it (prior: its value then; false: there
-- was none, and it is deleted), so an owner that held it (a paused one, whose lease ran out) may still
-- finish, and a later "done" at the token it had is still stored; a takeover's death (kills: the count
-- it reached) is counted off again, so the next takeover reports the count this one reported. The
-- token the fetch took was never handed to anyone. Nothing here fails its caller (which then fails
-- with the refusal).
local function claim_give_back(key, prior, kills, stats)
    if prior then
        redis.pcall("set", key, prior, "KEEPTTL")
    else
        redis.pcall("del", key)
    end
    if kills then
        if redis.pcall("decr", kills_key(key)) == 0 then redis.pcall("del", kills_key(key)) end
        redis.pcall("hincrby", stats, "takeovers", -1)
    end
end

-- Taking claims: a call opens a batch (one read of the deployment's fencing counter, the field
-- "fence" of the stats hash), takes claims, and closes it (one write of the counter, if it moved).
-- ``read``: the field as the caller already read it (false: absent), else nil.
local function claims_open(stats, lease_ms, ttl_s, now, read)
    if read == nil then read = redis.call("hget", stats, "fence") end
    local fence = tonumber(read) or 0
    return {stats = stats, lease_ms = lease_ms, ttl_s = ttl_s, now = now, fence = fence, first = fence}
end

local function claims_close(b)
    if b.fence ~= b.first then redis.call("hset", b.stats, "fence", b.fence) end
end

local function claim_put(b, key, token, owner)
    redis.call("set", key, claim_value("claimed", token, b.now + b.lease_ms, owner, ""), "EX", b.ttl_s)
end

-- {"run", token} claimed with a new token, {"run", token, kills} a takeover (a lease had expired:
-- its owner died, the kills-th in a row); {"busy", token, expires_in_ms} a live owner holds it;
-- {"done", token, result} it succeeded before.
local function claim_take(b, key, owner)
    -- A key never claimed (the usual case) costs one SET NX.
    if redis.call("set", key, claim_value("claimed", b.fence + 1, b.now + b.lease_ms, owner, ""),
                  "NX", "EX", b.ttl_s) then
        b.fence = b.fence + 1
        b.prior = false
        return {"run", b.fence}
    end
    local state, holder, token, expires, result = claim_read(key)
    -- The claim as found, which a claim this call wins replaces: what claim_give_back writes back (a
    -- value that does not read as a claim, taken as none, goes as none).
    b.prior = state and claim_value(state, token, expires, holder, result)
    if state == "done" then
        redis.call("hincrby", b.stats, "duplicates", 1)
        return {"done", token, result or ""}
    end
    if state == "claimed" then
        if holder == owner then -- the same attempt asking again (a client retry after a lost reply)
            claim_put(b, key, token, owner)
            return {"run", token}
        end
        if expires > b.now then
            return {"busy", token, expires - b.now}
        end
        redis.call("hincrby", b.stats, "takeovers", 1)
        local kills = redis.call("incr", kills_key(key))
        redis.call("expire", kills_key(key), b.ttl_s)
        b.fence = math.max(b.fence, token) + 1
        claim_put(b, key, b.fence, owner)
        return {"run", b.fence, kills}
    end
    -- max: a claim older than the counter (its stats lost) moves the counter past it
    b.fence = math.max(b.fence, token) + 1
    claim_put(b, key, b.fence, owner)
    return {"run", b.fence}
end

-- The envelope key of a message as the mesh encodes it ({"queue_name", "actor_name", "args": [{"key":
-- ...}], ...}), found without decoding it; nil for any other shape or an escaped key (that message
-- claims its key itself when it runs). The consumer checks the key against the decoded message.
local function message_key(data)
    local _, e = string.find(data, '"args":[{"key":"', 1, true)
    if not e then return nil end
    local close = string.find(data, '"', e + 1, true)
    if not close or close == e + 1 then return nil end
    local key = string.sub(data, e + 1, close - 1)
    if string.find(key, "\\", 1, true) then return nil end
    return key
end
