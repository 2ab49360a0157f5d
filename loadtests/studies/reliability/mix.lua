-- POSTs the requests listed in KILN_MIX in turn (one a line: path, content type and body file,
-- tab-separated) and counts the answers by status, which wrk's own report lumps together.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses, mix, turn = {}, {}, 0
  local token = os.getenv("KILN_WRK_TOKEN")
  for line in io.lines(os.getenv("KILN_MIX")) do
    local path, ctype, file = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
    local f = assert(io.open(file, "rb"))
    local headers = {["Content-Type"] = ctype, ["Authorization"] = "Bearer " .. token}
    table.insert(mix, wrk.format("POST", path, headers, f:read("*a")))
    f:close()
  end
end

function request()
  turn = turn % #mix + 1
  return mix[turn]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      io.write(string.format("kiln-status %d %d\n", status, count))
    end
  end
end
