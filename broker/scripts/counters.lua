-- A worker process's success counters, added up in memory over an interval and written at once
-- (broker/observe.py, Counters): the outcomes and handler-duration histogram fields its steps' success
-- writes would each have added to.
--
-- counters(keys=[{ns}, flushed], args=[seq, ttl_s, (kind, key, field, by)...])
--
--   {ns}     the namespace's bare prefix (never a key): declared so that, while the namespace's slot
--            migrates, the source never runs it (it answers ASK or TRYAGAIN, and the call waits, see
--            broker/connection.py on_slot): the counters it writes are keys it does not declare, which
--            may be on the target already
--   flushed  {ns}:outcomes.flushed:{process}: the last batch of this process written (its seq); a
--            batch sent again (its answer was lost) finds it and adds nothing: 0. Kept ttl_s from
--            the last batch.
--   kind     "i" HINCRBY (an integer's digits), "f" HINCRBYFLOAT
--
-- 1 written. A counter Redis refuses (a key of the wrong type) is left out, and logged; the others land.
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call("get", KEYS[2]) or "-1")
if last and seq <= last then return 0 end
redis.call("set", KEYS[2], ARGV[1], "EX", ARGV[2])
for i = 3, #ARGV, 4 do
    local kind, key, field, by = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local ok, err = pcall(redis.call, kind == "i" and "hincrby" or "hincrbyfloat", key, field, by)
    if not ok then
        local message = type(err) == "table" and err.err or tostring(err)
        redis.log(redis.LOG_WARNING, "mesh counters.lua: counter " .. key .. " " .. field .. " refused: " .. message)
    end
end
return 1
