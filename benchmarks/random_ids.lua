-- wrk script: GET /order/{id} for ids drawn at random from the file named by IDS_FILE.
local ids = {}
for line in io.lines(os.getenv("IDS_FILE")) do
  ids[#ids + 1] = line
end

function setup(thread)
  thread:set("seed", math.random(1, 2147483647))
end

function init()
  math.randomseed(seed)
end

function request()
  return wrk.format("GET", "/order/" .. ids[math.random(#ids)])
end
