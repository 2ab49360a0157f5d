-- The front proxy's inference keys, held by each nginx worker (Debian's libnginx-mod-http-lua).
-- deploy/front.py writes them to nginx's keys list; a worker reads the list again every few
-- tenths of a second and takes a change at once, so that a key change needs no reload (a
-- reload closes idle kept-alive client connections: loadtests/studies/reload_keepalive.py).
-- After taking a list, a worker writes the list's first line to its own file (keys.taken.PID),
-- which is how `kiln keys` knows that nginx has the keys before it tells anyone about them.
-- Nothing here logs a key.

local M = {}

-- "Bearer KEY" and "bearer KEY" -> the second the key ends (math.huge: never). The whole
-- Authorization header is looked up, so a key matches exactly (case included) and only alone.
local ends = {}
local path, taken_path
local text  -- the list as last read (false: unreadable, logged once)

-- The list's keys and its first line ("# GENERATION"), or nil when it is not Kiln's format.
local function parse(list)
    local generation = list:match("^# (%x+)\n")
    if not generation then
        return nil
    end
    local parsed = {}
    for line in list:gmatch("[^\n]+") do
        if line:sub(1, 1) ~= "#" then
            local key, ends_at = line:match("^(%S+) (%S+)$")
            local t = ends_at == "-" and math.huge or tonumber(ends_at or "")
            if not t then
                return nil
            end
            parsed["Bearer " .. key] = t
            parsed["bearer " .. key] = t
        end
    end
    return parsed, generation
end

local function acknowledge(generation)
    local tmp = taken_path .. ".tmp"
    local out, err = io.open(tmp, "w")
    if not out then
        ngx.log(ngx.ERR, "kiln keys: cannot write ", tmp, ": ", err)
        return
    end
    out:write(generation, "\n")
    out:close()
    os.rename(tmp, taken_path)
end

local function load()
    local file, err = io.open(path, "rb")
    if not file then
        if text ~= false then
            ngx.log(ngx.ERR, "kiln keys: cannot read ", err, ": keeping the keys loaded before")
            text = false
        end
        return
    end
    local list = file:read("*a")
    file:close()
    if list == text then
        return
    end
    text = list
    local parsed, generation = parse(list)
    if not parsed then
        ngx.log(ngx.ERR, "kiln keys: ", path, " is not a keys list: keeping the keys loaded before")
        return
    end
    ends = parsed
    acknowledge(generation)
end

-- In each worker as it starts (before it reads a request), then every `every` seconds.
function M.start(list, taken_prefix, every)
    path, taken_path = list, taken_prefix .. ngx.worker.pid()
    load()
    local ok, err = ngx.timer.every(every, function(premature)
        if not premature then
            load()
        end
    end)
    if not ok then
        ngx.log(ngx.ERR, "kiln keys: no timer to read the keys again: ", err)
    end
end

function M.stop()
    os.remove(taken_path)
end

-- 1 when the header holds a key valid at `now` ($msec's time: ngx.now()), else 0.
function M.check(authorization, now)
    local ends_at = authorization and ends[authorization]
    if ends_at and now < ends_at then
        return 1
    end
    return 0
end

return M
