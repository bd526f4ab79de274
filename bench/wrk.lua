-- wrk script for bench/run.py.
--   BENCH_WRITE=1        POST a FHIR R4 Observation (Content-Type application/fhir+json);
--   BENCH_BODY_FILE=F    send the body in file F (Content-Type application/fhir+json) with BENCH_METHOD
--                        (PUT of an Observation, POST of a transaction Bundle, ...);
--   otherwise            the plain GET given on the command line.
-- The X-API-Key header comes from wrk's -H. At the end one line "BENCH_JSON {...}" carries the
-- numbers run.py reads (latencies in microseconds), so nothing depends on wrk's text layout.

local body_file = os.getenv("BENCH_BODY_FILE")
if os.getenv("BENCH_WRITE") == "1" then
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/fhir+json"
  wrk.body = '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}'
elseif body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = os.getenv("BENCH_METHOD") or "POST"
  wrk.headers["Content-Type"] = "application/fhir+json"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"max":%.0f,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
