#!/usr/bin/env bash
# What a refused request costs a front end: a flood of one full session's steps (issue 11).
#
#   bench/refusals.sh [CONNECTIONS=64] [SECONDS=8] [PORT=8123]
#
# Starts the service (python -m service, the shipped models, 2 front ends, PSN_LOG_LEVEL=warning), opens a
# session, stops the engine core (SIGSTOP) so that nothing is answered but refusals, and floods the session's
# `POST /v1/sessions/{id}/steps` with wrk (Debian's `wrk`) over CONNECTIONS kept-alive connections: the first
# PSN_SESSION_QUEUE requests per front end wait, every other one is a 429 `session_queue_full`. Prints wrk's
# requests/s and the front ends' CPU per request (from /proc). Run it from any checkout (it uses that tree).
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-64}; SECS=${2:-8}; PORT=${3:-8123}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
PSN_PORT=$PORT PSN_LOG_LEVEL=warning PSN_WORKERS=2 PSN_REQUEST_TIMEOUT_S=120 "$PY" -m service > /tmp/psn-refusals.log 2>&1 &
SVC=$!
ENG=""
cleanup() { [ -n "$ENG" ] && kill -CONT "$ENG" 2>/dev/null; kill "$SVC" 2>/dev/null; wait "$SVC" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 150); do curl -sf "localhost:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
SID=$(curl -sf -XPOST "localhost:$PORT/v1/sessions" -H 'content-type: application/json' \
      -d '{"model":"mnist1d-sliding"}' | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["session_id"])')
ENG=$(curl -sf "localhost:$PORT/healthz" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["engine_pid"])')
# Every front end must know the session's model before the engine core stops: one that does not would ask
# the engine core (a `get`) and hold every request of the flood instead of refusing it. A kept-alive
# connection asks /healthz (which front end is this?) and then the session, until both have been asked.
"$PY" - "$PORT" "$SID" <<'PY'
import http.client, json, sys
port, sid, seen = int(sys.argv[1]), sys.argv[2], set()
for _ in range(200):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/healthz"); worker = json.loads(c.getresponse().read())["worker"]
    c.request("GET", f"/v1/sessions/{sid}"); c.getresponse().read(); c.close()
    seen.add(worker)
    if len(seen) == 2:
        break
else:
    sys.exit(f"only front ends {sorted(seen)} answered")
PY
LUA=$(mktemp --suffix .lua)
printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\nwrk.path = "/v1/sessions/%s/steps"\n' \
       "'{\"steps\": [[0.5]]}'" "$SID" > "$LUA"
FES=$(pgrep -P "$SVC" | grep -vx "$ENG" | tr '\n' ' ')
cpu() { local t=0; for p in $FES; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
kill -STOP "$ENG"
t0=$(cpu)
OUT=$(wrk -t1 -c"$C" -d"${SECS}s" -s "$LUA" "http://127.0.0.1:$PORT")
t1=$(cpu)
rm -f "$LUA"
TOTAL=$(echo "$OUT" | awk '/requests in/ {print $1}')
echo "$(date -u '+%F %T') UTC, $(nproc) cores, $C connections, ${SECS} s: $(echo "$OUT" | awk '/Requests\/sec/ {print $2}') requests/s," \
     "$(echo "$OUT" | awk '/Non-2xx/ {print $NF}') of $TOTAL refused, front ends' CPU per request" \
     "$("$PY" -c "print(round(($t1 - $t0) * 1e6 / $(getconf CLK_TCK) / $TOTAL, 1))") us"
