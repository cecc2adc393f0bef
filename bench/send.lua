-- wrk script: POST the documented send example; stop each thread after its share of
-- `SENDKIT_BENCH_TOTAL` requests (0 = run for the duration).
local token = os.getenv("SENDKIT_BENCH_TOKEN")
local total = tonumber(os.getenv("SENDKIT_BENCH_TOTAL") or "0")
local threads = tonumber(os.getenv("SENDKIT_BENCH_THREADS") or "2")
local body_size = tonumber(os.getenv("SENDKIT_BENCH_BODY") or "0")
local per_thread = total > 0 and math.ceil(total / threads) or 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json; charset=utf-8"
wrk.headers["Authorization"] = "Bearer " .. (token or "")
local filler = body_size > 0 and string.rep("x", body_size) or "test content"
wrk.body = '{"from": "from@example.com", "to": "to@example.com", "subject": "test send", "body": "'
  .. filler .. '"}'

local sent = 0
local failures = 0

function request()
  sent = sent + 1
  return wrk.format()
end

function response(status, headers, body)
  if status ~= 200 then failures = failures + 1 end
  if per_thread > 0 and sent >= per_thread then wrk.thread:stop() end
end
