-- wrk script for bench/broker_load.py: each thread has one connection and one token; it asks
-- for a lease (POST, 201 expected) and releases it (DELETE, 200 expected), again and again.
local tokens = {}
for t in string.gmatch(os.getenv("BROKER_TOKENS"), "[^,]+") do
  table.insert(tokens, t)
end
local made = 0
function setup(thread)
  made = made + 1
  thread:set("token", tokens[made])
  thread:set("kid", "k" .. made)  -- a kernel id is its first user's: one per thread
end

local lease = nil
function request()
  local headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
  if lease == nil then
    return wrk.format("POST", "/api/v1/leases", headers, '{"kind": "sim", "kernel_id": "' .. kid .. '"}')
  end
  return wrk.format("DELETE", "/api/v1/leases/" .. lease, headers, "")
end

function response(status, headers, body)
  if lease == nil then
    lease = string.match(body, '"id": "(%w+)"')
  else
    lease = nil
  end
end

function done(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %.3f %.3f\n", summary.requests, summary.errors.status,
    summary.duration, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
