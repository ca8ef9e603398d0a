#!/usr/bin/env bash
# One GPU check, run from the repository root on a CUDA machine (about 4 minutes on an H200):
#   1. the fused Triton kernels' tests on the GPU;
#   2. bench/neurons.py on CUDA (T = 8, 32, 64; N = 2^16, 2^20), with a launch-configuration sweep at T=64, N=2^20;
#   3. bench/engine.py on CUDA at 1k, 16k and 128k sessions (CUDA graphs), and the asyncio engine at 1k and 16k;
#   4. the service on the GPU (PSN_DEVICE=cuda) serving exported/, every reference sample streamed over WS.
# Logs and JSON go to $OUT (default gpu-out/). Exits non-zero if a test or the stream check failed.
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
PORT=${PSN_CHECK_PORT:-18080}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
fail=0
step() { echo; echo "== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/machine.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/machine.txt"

step "kernel tests on the GPU"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/tests.log" || fail=1

step "neurons"
timeout 240 $PY bench/neurons.py --device cuda --sweep --json "$OUT/neurons.json" 2>&1 | tee "$OUT/neurons.log" \
    || echo "neurons bench failed"

step "engine"
timeout 120 $PY bench/engine.py --device cuda --sessions 1024 16384 131072 --cuda-graphs 2>&1 | tee "$OUT/engine.log" \
    || echo "engine bench failed"
timeout 90 $PY bench/engine.py --device cuda --sessions 1024 16384 --engine --no-one-by-one --rounds 5 --repeat 5 \
    2>&1 | tee -a "$OUT/engine.log" || echo "asyncio engine bench failed"

step "service on the GPU"
PSN_DEVICE=cuda PSN_PORT=$PORT $PY -m service >"$OUT/service.log" 2>&1 &
pid=$!
ready=0
for _ in $(seq 120); do
    if $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/readyz', timeout=2)" 2>/dev/null; then
        ready=1; break
    fi
    sleep 1
done
if [ $ready = 1 ]; then
    timeout 60 $PY scripts/stream_check.py "127.0.0.1:$PORT" exported 2>&1 | tee "$OUT/stream.log" || fail=1
    $PY -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$PORT/readyz').read().decode())" \
        | tee -a "$OUT/stream.log"
else
    echo "service not ready after 120 s"; tail -30 "$OUT/service.log"; fail=1
fi
kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
tail -3 "$OUT/service.log"
step "done (fail=$fail)"
exit $fail
