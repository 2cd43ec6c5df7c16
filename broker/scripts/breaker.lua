-- A circuit breaker per dependency, shared by every worker on every host (see broker/keys.py).
-- Each transition is one atomic call; times come from the Redis server's clock.
--
-- breaker(keys=[breaker_hash, failures_zset, index_set, errors_list],
--         args=[command, name, owner, threshold, window_ms, cooldown_ms, max_cooldown_ms, probe_ttl_ms, error])
--
--   admit     -> {"closed"} call away | {"probe"} the one call of a half-open window is yours
--                {"open", wait_ms} no call until the reopen time | {"half_open", wait_ms} a probe is in flight
--   success   -> the state after it: a probe's success closes the breaker
--   failure   -> {state, wait_ms}: closed → open after `threshold` failures within `window_ms`;
--                a probe's failure reopens with twice the cool-down (at most max_cooldown_ms)
--   reset     -> "closed", whatever it was
--
-- Opening keeps what opened it in the hash: opened_failures (how many failures) and opened_errors
-- (JSON list of {at, error}, newest first), since the failure window itself is cleared on opening.

local key, failures, index, errors = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local command, name, owner = ARGV[1], ARGV[2], ARGV[3]
local threshold, window_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local base_cooldown, max_cooldown, probe_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local h = redis.call("hmget", key, "state", "reopen_at", "cooldown_ms", "probe", "probe_expires")
local state = h[1] or "closed"
local reopen_at, cooldown = tonumber(h[2]) or 0, tonumber(h[3]) or base_cooldown
local probe, probe_expires = h[4], tonumber(h[5]) or 0

local function open(ms, count)
    local recent = {}
    for _, item in ipairs(redis.call("lrange", errors, 0, -1)) do
        local ok, e = pcall(cjson.decode, item)
        if ok and type(e) == "table" and tonumber(e.at) and tonumber(e.at) > now - window_ms then
            recent[#recent + 1] = e
        end
    end
    if #recent == 0 then recent = {{at = now, error = ARGV[9]}} end
    redis.call("hset", key, "state", "open", "reopen_at", now + ms, "cooldown_ms", ms, "opened_at", now,
               "opened_failures", count, "opened_errors", cjson.encode(recent))
    redis.call("hdel", key, "probe", "probe_expires")
    redis.call("hincrby", key, "trips", 1)
    redis.call("del", failures, errors)
    return {"open", ms}
end

local function remember(error)
    redis.call("lpush", errors, cjson.encode({at = now, error = error}))
    redis.call("ltrim", errors, 0, math.max(threshold, 1) - 1)
    redis.call("pexpire", errors, window_ms)
end

local function start_probe()
    redis.call("hset", key, "state", "half_open", "probe", owner, "probe_expires", now + probe_ttl)
    return {"probe"}
end

if command == "admit" then
    if state == "closed" then return {"closed"} end
    if state == "open" then
        if now < reopen_at then return {"open", reopen_at - now} end
        return start_probe()
    end
    -- half open: one probe at a time across the fleet; a probe whose worker died expires.
    if probe == owner then return {"probe"} end -- the probe's own admit, re-sent after a lost reply
    -- The others look again after at most a cool-down: the probe usually answers well before.
    if probe_expires > now then return {"half_open", math.min(probe_expires - now, cooldown)} end
    return start_probe()

elseif command == "success" then
    if state == "half_open" and probe == owner then
        redis.call("hset", key, "state", "closed", "cooldown_ms", base_cooldown, "closed_at", now)
        redis.call("hdel", key, "probe", "probe_expires", "reopen_at")
        redis.call("del", failures, errors)
        return "closed"
    end
    return state

elseif command == "failure" then
    redis.call("sadd", index, name)
    redis.call("hset", key, "last_error", ARGV[9], "last_failure_at", now)
    if state == "half_open" then
        if probe == owner then
            redis.call("del", errors)
            remember(ARGV[9])
            return open(math.min(cooldown * 2, max_cooldown), 1)
        end
        return {"half_open", math.min(math.max(probe_expires - now, 0), cooldown)}
    end
    if state == "open" then return {"open", math.max(reopen_at - now, 0)} end
    redis.call("zadd", failures, now, owner)
    redis.call("zremrangebyscore", failures, 0, now - window_ms)
    redis.call("pexpire", failures, window_ms)
    remember(ARGV[9])
    local count = redis.call("zcard", failures)
    if count >= threshold then return open(base_cooldown, count) end
    if redis.call("hsetnx", key, "state", "closed") == 1 then
        redis.call("hset", key, "cooldown_ms", base_cooldown)
    end
    return {"closed", 0}

elseif command == "reset" then
    redis.call("hset", key, "state", "closed", "cooldown_ms", base_cooldown, "closed_at", now)
    redis.call("hdel", key, "probe", "probe_expires", "reopen_at")
    redis.call("del", failures, errors)
    return "closed"
end

return redis.error_reply("unknown breaker command " .. tostring(command))
