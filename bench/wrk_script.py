"""The Lua script wrk runs: new ids in every request, and a JSON line of results at the end."""

from __future__ import annotations

from .payloads import KINDS

LUA = r"""
local counter = 0
local seed = tonumber(os.getenv("BENCH_SEED") or "1")
local n = tonumber(os.getenv("BENCH_EVENTS") or "1")
local path = os.getenv("BENCH_PATH")
local headers = {["Content-Type"] = "application/json"}
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then headers["Authorization"] = auth end
local EVENT = [==[%(event)s]==]
local PREFIX = [==[%(prefix)s]==]
local SUFFIX = [==[%(suffix)s]==]
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
end

function request()
  counter = counter + 1
  local session = seed * 100 + (tid or 0)
  local parts = {}
  for i = 1, n do
    parts[i] = string.format(EVENT, counter * n + i, session)
  end
  return wrk.format("POST", path, headers, PREFIX .. table.concat(parts, ",") .. SUFFIX)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"errors_status":%%d,"errors_connect":%%d,' ..
    '"errors_read":%%d,"errors_write":%%d,"errors_timeout":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def lua_for(kind: str) -> str:
    event, prefix, suffix = KINDS[kind]
    return LUA % {"event": event, "prefix": prefix, "suffix": suffix}
