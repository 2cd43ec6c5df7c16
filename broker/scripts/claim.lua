-- The idempotency claim on one message key (see broker/keys.py): each phase is one atomic step.
--
-- claim(keys=[claim_key, stats_key], args=[command, owner, lease_ms, ttl_s, ...])
--
--   claim                  -> {"run", token} claimed with a new token (a takeover if a lease had expired)
--                             {"busy", token, expires_in_ms} a live owner holds it: defer the duplicate
--                             {"done", token, result} it succeeded before: ack the duplicate
--   renew                  -> 1 the lease is extended, 0 it is no longer ours
--   done    result         -> 1 stored as done (or already done), 0 the lease was lost to another owner
--   release token          -> 1 freed for the next attempt (the token is kept), or already freed by this
--                             attempt; 0 another owner holds it, freed it under a later token, or finished it
--
-- Fencing tokens come from one counter per deployment, the field "fence" of the stats hash: every
-- claim that runs (the first, after a release, a takeover, and a claim made once the key's hash has
-- expired after the dedup window) takes the next value. So a key's token only ever grows, even
-- across the expiry that forgets the key, and no two claims in a deployment share a token; an
-- endpoint may compare tokens per key. (Tokens are not dense per key.) Lease times come from the
-- Redis server's clock, so hosts need not agree on the time.

local key, stats = KEYS[1], KEYS[2]
local command, owner = ARGV[1], ARGV[2]
local lease_ms, ttl_s = tonumber(ARGV[3]), tonumber(ARGV[4])

local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local current = redis.call("hmget", key, "state", "owner", "token", "expires", "result")
local state, holder, token, expires = current[1], current[2], tonumber(current[3]) or 0, tonumber(current[4]) or 0
local ours = state == "claimed" and holder == owner

if command == "claim" then
    if state == "done" then
        redis.call("hincrby", stats, "duplicates", 1)
        return {"done", token, current[5] or ""}
    end
    if ours then -- the same attempt asking again (a client retry after a lost reply)
        redis.call("hset", key, "expires", now + lease_ms)
        return {"run", token}
    end
    if state == "claimed" then
        if expires > now then
            return {"busy", token, expires - now}
        end
        redis.call("hincrby", stats, "takeovers", 1)
    end
    local fence = redis.call("hincrby", stats, "fence", 1)
    if fence <= token then -- a claim older than the counter: move the counter past it
        fence = token + 1
        redis.call("hset", stats, "fence", fence)
    end
    token = fence
    redis.call("hset", key, "state", "claimed", "owner", owner, "token", token, "expires", now + lease_ms)
    redis.call("expire", key, ttl_s)
    return {"run", token}

elseif command == "renew" then
    if not ours then return 0 end
    redis.call("hset", key, "expires", now + lease_ms)
    redis.call("expire", key, ttl_s) -- a handler running past the dedup window keeps its claim
    return 1

elseif command == "done" then
    if state == "done" then return 1 end
    if not ours then return 0 end
    redis.call("hset", key, "state", "done", "result", ARGV[5], "done_at", now)
    redis.call("hdel", key, "expires")
    redis.call("expire", key, ttl_s)
    return 1

elseif command == "release" then
    -- ARGV[5]: the releasing attempt's token. Done, or free under a later token, means another owner
    -- took the key over (and finished or failed it) meanwhile: this attempt was superseded.
    if state == "done" then return 0 end
    if state ~= "claimed" then return (tonumber(ARGV[5]) or token) == token and 1 or 0 end
    if not ours then return 0 end
    redis.call("hset", key, "state", "free")
    redis.call("hdel", key, "owner", "expires")
    return 1
end

return redis.error_reply("unknown claim command " .. tostring(command))
