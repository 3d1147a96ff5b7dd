-- wrk script: GET /order/{id} for ids drawn at random from the file named by IDS_FILE.
-- Requests are formatted once, up front: formatting one per call would make wrk itself the
-- bottleneck on a two-core machine.
local requests = {}

function setup(thread)
  thread:set("seed", math.random(1, 2147483647))
end

function init()
  math.randomseed(seed)
  for line in io.lines(os.getenv("IDS_FILE")) do
    requests[#requests + 1] = wrk.format("GET", "/order/" .. line)
  end
end

function request()
  return requests[math.random(#requests)]
end
