-- Variant C2: rotates over BENCH_TOKENS distinct (already cached) tokens
-- named BENCH_TOKEN_PREFIX .. %06d. The requests are built once in init(),
-- so the per-request Lua cost is one table read.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

local n = tonumber(os.getenv("BENCH_TOKENS") or "1000")
local prefix = os.getenv("BENCH_TOKEN_PREFIX") or "bench-rot-"
local reqs = {}
local i = 0

function init(args)
  for k = 0, n - 1 do
    reqs[k] = wrk.format("GET", "/", { ["Authorization"] = "Bearer " .. prefix .. string.format("%06d", k) })
  end
  -- Threads start at different points of the rotation.
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
  i = math.random(0, n - 1)
end

function request()
  local r = reqs[i]
  i = (i + 1) % n
  return r
end
