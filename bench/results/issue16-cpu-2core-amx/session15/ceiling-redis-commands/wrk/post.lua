
local f = assert(io.open(os.getenv("JLAD_WRK_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("JLAD_WRK_CONTENT_TYPE")
wrk.headers["Accept"] = os.getenv("JLAD_WRK_ACCEPT")
done = function(summary, latency, requests)
  io.write(string.format(
    "JLAD_WRK {\"requests\": %d, \"duration_us\": %d, \"status_errors\": %d, " ..
    "\"connect_errors\": %d, \"read_errors\": %d, \"timeouts\": %d, \"mean_us\": %.1f, " ..
    "\"p50_us\": %d, \"p90_us\": %d, \"p99_us\": %d, \"max_us\": %d}\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.timeout, latency.mean, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max))
end
