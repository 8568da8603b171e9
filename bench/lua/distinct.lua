-- RSS phase: every request carries a token never sent before:
-- BENCH_TOKEN_PREFIX .. <thread> .. "-" .. <counter>. Each thread stops after
-- BENCH_QUOTA responses, so a run sends threads x quota distinct tokens
-- (plus at most one in-flight request per connection). A thread that is done
-- drops BENCH_MARK_DIR/done-<thread>: wrk's main thread sleeps out -d whatever
-- its threads do, so bench/run.py wakes it (SIGINT) once every file is there.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

local prefix = os.getenv("BENCH_TOKEN_PREFIX") or "rss-"
local quota = tonumber(os.getenv("BENCH_QUOTA") or "1000")
local mark_dir = os.getenv("BENCH_MARK_DIR")
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local sent = 0
local answered = 0

function request()
  sent = sent + 1
  return wrk.format("GET", "/", { ["Authorization"] = "Bearer " .. prefix .. tid .. "-" .. sent })
end

function response(status, headers, body)
  answered = answered + 1
  if answered == quota then
    if mark_dir then
      local f = io.open(mark_dir .. "/done-" .. tid, "w")
      if f then f:close() end
    end
    wrk.thread:stop()
  end
end
