-- POST one fixed body with Kiln's headers; loadtests/wrk.py passes them in the environment.
local f = assert(io.open(os.getenv("KILN_WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("KILN_WRK_CONTENT_TYPE")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KILN_WRK_TOKEN")
