"""The Lua scripts wrk runs: new ids in every request (or one fixed body, for a sink's
ceiling), an optional stop after a number of responses, and a JSON line of results at the end."""

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

%(stop)s
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


# Defined only when a run is bounded in count: a response() hook costs wrk a Lua call per reply.
# The thread stops on the reply that reaches the count; requests still in flight on the other
# connections are then abandoned (at most one per connection), as the fill's depth shows.
# wrk's main thread sleeps for -d whatever its threads do, so a SIGINT to wrk (the shell's
# parent) ends that sleep and wrk reports as at the end of -d. It is sent from the background,
# again every 20 ms while wrk lives (at most 10 s): one SIGINT can be lost, as system()
# ignores SIGINT in wrk until the shell returns (past the first 10 ms on a busy machine), and
# one the kernel hands to a thread still running leaves the main thread asleep. A fill then
# sat idle for its whole -d (600 s) after its last reply. Only while $PPID is still a wrk:
# pids are reused, and the bench starts agents, which a SIGINT stops. Its output is not
# wrk's: the harness reads wrk's to its end.
STOP = r"""
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0")
local replies = 0
function response(status, headers, body)
  replies = replies + 1
  if replies == max_requests then
    wrk.thread:stop()
    os.execute("(i=0; while [ $i -lt 500 ]; do sleep 0.02; c=; { read c < /proc/$PPID/comm; }" ..
               " 2>/dev/null; [ \"$c\" = wrk ] || exit 0; kill -INT $PPID; i=$((i + 1)); done) >/dev/null 2>&1 &")
  end
end
"""

# One fixed body from BENCH_BODY_FILE: wrk's own request path, no Lua per request.
FIXED = r"""
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH")
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""


def lua_for(kind: str, bounded: bool = False, fixed: bool = False) -> str:
    """The script for ``kind`` (payloads.KINDS); ``fixed``: post BENCH_BODY_FILE as it is."""
    event, prefix, suffix = KINDS[kind]
    script = LUA % {"event": event, "prefix": prefix, "suffix": suffix,
                    "stop": STOP if bounded else ""}
    if fixed:
        # Keep the results line; drop the generated request() so wrk sends its static request.
        script = FIXED + script[script.index("function done"):]
    return script
