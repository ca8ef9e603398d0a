#!/usr/bin/env bash
# What one `POST /v1/sessions/{id}/steps` costs a front end (the HTTP path's own CPU per request).
#
#   bench/http_steps.sh [CONNECTIONS=16] [SECONDS=8] [PORT=8124] [STEPS=1]
#
# Starts the service (python -m service, the shipped models, 2 front ends, PSN_LOG_LEVEL=warning), opens
# CONNECTIONS sessions of mnist1d-sliding, and has wrk (Debian's `wrk`) post STEPS-step requests over
# CONNECTIONS kept-alive connections, each request to the next session in turn (never more requests in
# flight than sessions, so nothing is refused). Prints wrk's requests/s and latency, and the CPU per
# request of the front ends and of the engine core (from /proc). Run it from any checkout (it uses that tree).
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-16}; SECS=${2:-8}; PORT=${3:-8124}; STEPS=${4:-1}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
PSN_PORT=$PORT PSN_LOG_LEVEL=warning PSN_WORKERS=2 "$PY" -m service > /tmp/psn-http-steps.log 2>&1 &
SVC=$!
cleanup() { kill "$SVC" 2>/dev/null; wait "$SVC" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 150); do curl -sf "localhost:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
ENG=$(curl -sf "localhost:$PORT/healthz" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["engine_pid"])')
LUA=$(mktemp --suffix .lua)
"$PY" - "$PORT" "$C" "$STEPS" > "$LUA" <<'PY'
import http.client, json, sys
port, n, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
sids = []
for _ in range(n):
    c.request("POST", "/v1/sessions", body=json.dumps({"model": "mnist1d-sliding"}),
              headers={"content-type": "application/json"})
    sids.append(json.loads(c.getresponse().read())["session_id"])
body = json.dumps({"steps": [[0.5]] * steps})
print('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"')
print("local paths = {" + ",".join(f'"/v1/sessions/{s}/steps"' for s in sids) + "}")
print(f"local body = '{body}'\nlocal i = 0")
print("request = function()\n  i = i % #paths + 1\n  return wrk.format(nil, paths[i], nil, body)\nend")
PY
FES=$(pgrep -P "$SVC" | grep -vx "$ENG" | tr '\n' ' ')
cpu() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
f0=$(cpu $FES); e0=$(cpu "$ENG")
OUT=$(wrk -t1 -c"$C" -d"${SECS}s" --latency -s "$LUA" "http://127.0.0.1:$PORT")
f1=$(cpu $FES); e1=$(cpu "$ENG")
rm -f "$LUA"
TOTAL=$(echo "$OUT" | awk '/requests in/ {print $1}')
per() { "$PY" -c "print(round(($2 - $1) * 1e6 / $(getconf CLK_TCK) / $TOTAL, 1))"; }
echo "$(date -u '+%F %T') UTC, $(nproc) cores, $C connections/sessions, $STEPS step(s)/request, ${SECS} s:" \
     "$(echo "$OUT" | awk '/Requests\/sec/ {print $2}') requests/s (non-2xx: $(echo "$OUT" | awk '/Non-2xx/ {print $NF}')" \
     "of $TOTAL), p50 $(echo "$OUT" | awk '$1 == "50%" {print $2}') p99 $(echo "$OUT" | awk '$1 == "99%" {print $2}');" \
     "CPU per request: front ends $(per "$f0" "$f1") us, engine core $(per "$e0" "$e1") us"
