-- Put one dead letter back (mesh dlq load): written with its indexes only if its id is not in the
-- DLQ already, so loading the same export twice adds nothing. See broker/keys.py for the layout.
--
-- put(keys=[dlq, entry_hash, agent_index, class_index, agents_set, job_index, jobs_since],
--     args=[entry_id, at_ms, entry, raw, agent, class, has_job ("1" or "")])
--   -> 1 written, 0 already there

local dlq, entry_key, by_agent, by_class = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local entry_id, at = ARGV[1], tonumber(ARGV[2])
if redis.call("zadd", dlq, "NX", at, entry_id) == 0 then
    return 0
end
redis.call("hset", entry_key, "entry", ARGV[3], "raw", ARGV[4], "agent", ARGV[5], "class", ARGV[6])
redis.call("zadd", by_agent, at, entry_id)
redis.call("zadd", by_class, at, entry_id)
redis.call("sadd", KEYS[5], ARGV[5])
if ARGV[7] == "1" then
    redis.call("zadd", KEYS[6], at, entry_id)
    redis.call("set", KEYS[7], redis.call("time")[1] * 1000, "NX")
end
return 1
