-- The next entries of a DLQ index after a cursor, oldest first. See broker/keys.py for the layout.
--
-- A sorted set orders its members by score (the dead-lettered time), then by the bytes of the
-- member (the entry id). The cursor is the (score, id) of the last entry the walk read: its place
-- is found again whether or not that entry, or any other, was removed since, so a walk neither
-- reads an entry twice nor skips one, however (and whenever) its caller removes what it was handed.
-- The walk stops at (end score, end id), the last entry in range when it started: what is
-- dead-lettered while it runs is not taken.
--
-- walk(keys=[index], args=[after_score, after_id, end_score, end_id, count])
--   -> {id1, score1, id2, score2, ...}: at most count entries after (after_score, after_id) and at
--      or before (end_score, end_id); after_id "" starts at the first entry of after_score itself

local index = KEYS[1]
local after_score, after_id = ARGV[1], ARGV[2]
local end_score, end_id = tonumber(ARGV[3]), ARGV[4]
local count = tonumber(ARGV[5])

-- Byte order, as the sorted set compares members (Lua's < on strings follows the server's locale).
local function sorts_before(a, b)
    for i = 1, math.min(#a, #b) do
        local x, y = string.byte(a, i), string.byte(b, i)
        if x ~= y then
            return x < y
        end
    end
    return #a < #b
end

-- The rank of the first entry after the cursor: past every lower score, then a binary search of the
-- entries that share the cursor's score (ranked among themselves in byte order) for the first id
-- after the cursor's.
local lo = redis.call("zcount", index, "-inf", "(" .. after_score)
local hi = lo + redis.call("zcount", index, after_score, after_score)
while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if sorts_before(after_id, redis.call("zrange", index, mid, mid)[1]) then
        hi = mid
    else
        lo = mid + 1
    end
end

local out = {}
local rows = redis.call("zrange", index, lo, lo + count - 1, "withscores")
for i = 1, #rows, 2 do
    local id, score = rows[i], tonumber(rows[i + 1])
    if score > end_score or (score == end_score and sorts_before(end_id, id)) then
        break
    end
    out[#out + 1] = id
    out[#out + 1] = rows[i + 1]
end
return out
