#!/usr/bin/env bash
# One GPU check, run from the repository root on a CUDA machine (about 4 minutes on an H200; the Python packages must be importable):
#   1. the fused Triton kernels' tests on the GPU;
#   2. bench/engine.py on CUDA at 1k, 16k and 128k sessions (CUDA graphs): the plain PyTorch step and the fused
#      slot kernel; the asyncio engine at 1k sessions;
#   3. the service on the GPU (PSN_DEVICE=cuda) serving exported/, every reference sample streamed over WS;
#   4. bench/neurons.py on CUDA (T = 8, 32, 64; N = 2^16, 2^20; NEURONS_ARGS adds options, e.g. --no-backward),
#      with a launch-configuration sweep at T=64, N=2^20.
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

step "engine: plain PyTorch step (PSN_FUSED=0), then the fused in-place slot kernel"
PSN_FUSED=0 timeout 60 $PY bench/engine.py --device cuda --sessions 1024 16384 131072 --cuda-graphs --no-one-by-one \
    2>&1 | tee "$OUT/engine.log" || echo "engine bench (plain) failed"
timeout 60 $PY bench/engine.py --device cuda --sessions 1024 16384 131072 --cuda-graphs 2>&1 | tee -a "$OUT/engine.log" \
    || echo "engine bench failed"
timeout 60 $PY bench/engine.py --device cuda --sessions 1024 --engine --rounds 10 --repeat 5 2>&1 \
    | tee -a "$OUT/engine.log" || echo "asyncio engine bench failed"

step "service on the GPU"
PSN_DEVICE=cuda PSN_PORT=$PORT $PY -m service >"$OUT/service.log" 2>&1 &
pid=$!
ready=0
for _ in $(seq 60); do
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
    echo "service not ready after 60 s"; tail -30 "$OUT/service.log"; fail=1
fi
kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
tail -3 "$OUT/service.log"

step "neurons"
timeout "${NEURONS_TIMEOUT:-150}" $PY bench/neurons.py --device cuda --sweep ${NEURONS_ARGS:-} --json "$OUT/neurons.json" \
    2>&1 | tee "$OUT/neurons.log" || echo "neurons bench failed"

step "done (fail=$fail)"
exit $fail
