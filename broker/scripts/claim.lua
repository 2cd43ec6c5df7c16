-- The idempotency claim on message keys (see broker/keys.py): each call is one atomic step.
-- Runs after claim_lib.lua (the claim's one-string format and its readers).
--
-- claim(keys=[stats_key, claim_key...], args=[command, lease_ms, ttl_s, ...])
--
--   claim    owner...       -> per key, in order:
--                              {"run", token} claimed with a new token (a takeover if a lease had expired)
--                              {"busy", token, expires_in_ms} a live owner holds it: defer the duplicate
--                              {"done", token, result} it succeeded before: ack the duplicate
--                              (a consumer claims a whole fetched batch in one call)
--   renew    owner          -> 1 the lease is extended, 0 it is no longer ours
--   done     owner, result [, token]
--                           -> 1 stored as done (or already done), 0 the lease was lost to another owner;
--                              with ``token`` (a shared key's claim, broker/shared_claims.py): 0 too when the
--                              key is done under another token (another attempt finished it), 1 when this
--                              attempt's own done landed before (sent again)
--   keep     owner, result, token
--                           -> 1 the done key's result replaced by ``result`` (a shared key's claim, once the
--                              job's record holds the output it names), 0 not done under ``token``: left alone
--   release  owner, token   -> 1 freed for the next attempt (the token is kept), or already freed by this
--                              attempt; 0 another owner holds it, freed it under a later token, or finished it
--
-- settle.lua's fetch takes the claims of the messages it fetches the same way (claim_take), in
-- the same step.
--
-- Fencing tokens come from one counter per deployment, the field "fence" of the stats hash: every
-- claim that runs (the first, after a release, a takeover, and a claim made once the key has
-- expired after the dedup window) takes a value of it. So a key's token only ever grows, even
-- across the expiry that forgets the key, and no two claims in a deployment share a token; an
-- endpoint may compare tokens per key. (Tokens are not dense per key.) Lease times come from the
-- Redis server's clock, so hosts need not agree on the time.

local stats = KEYS[1]
local command = ARGV[1]
local lease_ms, ttl_s = tonumber(ARGV[2]), tonumber(ARGV[3])

local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if command == "claim" then
    local batch = claims_open(stats, lease_ms, ttl_s, now)
    local out = {}
    for i = 1, #KEYS - 1 do
        out[i] = claim_take(batch, KEYS[i + 1], ARGV[3 + i])
    end
    claims_close(batch)
    return out
end

local key, owner = KEYS[2], ARGV[4]

if command == "renew" then
    local state, holder, token = claim_read(key)
    if state ~= "claimed" or holder ~= owner then return 0 end
    -- EX: a handler running past the dedup window keeps its claim
    claim_put({lease_ms = lease_ms, ttl_s = ttl_s, now = now}, key, token, owner)
    return 1

elseif command == "done" then
    if ARGV[6] then
        local state, _, token = claim_read(key)
        if state == "done" then return token == tonumber(ARGV[6]) and 1 or 0 end
    end
    return claim_done(key, owner, ARGV[5], ttl_s)

elseif command == "keep" then
    local state, _, token = claim_read(key)
    if state ~= "done" or token ~= tonumber(ARGV[6]) then return 0 end
    redis.call("set", key, claim_value("done", token, 0, "", ARGV[5]), "KEEPTTL")
    return 1

elseif command == "release" then
    -- ARGV[5]: the releasing attempt's token. Done, or free under a later token, means another owner
    -- took the key over (and finished or failed it) meanwhile: this attempt was superseded.
    local state, _, token = claim_read(key)
    if state == "done" then return 0 end
    if state ~= "claimed" then return (tonumber(ARGV[5]) or token) == token and 1 or 0 end
    return claim_free(key, owner)
end

return redis.error_reply("unknown claim command " .. tostring(command))
