-- One fixed request (the Authorization header comes from wrk -H): variants
-- A, B, C and D. No request() function, so wrk sends a pre-built request.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
