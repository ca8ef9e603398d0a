"""Stream every model's reference samples (its reference.json) over WS /v1/stream and compare.

    python scripts/stream_check.py HOST:PORT MODELS_DIR [MODEL]

For each sample (at its true length, ``lengths`` in reference.json): open a session, send the
sequence 10 steps a message, close; the last output's
prediction must equal the reference prediction and its scores be within 1e-3. Exits 1 on any failure.
Used by scripts/docker-smoke (against the container) and by the GPU device check.
"""
import json
import os
import sys
import urllib.request

from websockets.sync.client import connect

if sys.argv[1:] in (["-h"], ["--help"]):
    print(__doc__)
    sys.exit(0)
if len(sys.argv) not in (3, 4) or not os.path.isdir(sys.argv[2]):  # was an IndexError or FileNotFoundError
    why = "no such folder: " + sys.argv[2] if len(sys.argv) in (3, 4) else "expected 2 or 3 arguments"
    print(f"stream_check: {why}\nusage: python scripts/stream_check.py HOST:PORT MODELS_DIR [MODEL]", file=sys.stderr)
    sys.exit(2)
base, models_dir = sys.argv[1], sys.argv[2]
only = sys.argv[3] if len(sys.argv) > 3 else ""
http, ws_url = f"http://{base}", f"ws://{base}/v1/stream"
try:
    ready = json.load(urllib.request.urlopen(http + "/readyz", timeout=10))
except (OSError, ValueError) as e:  # URLError, a refused connection, a non-JSON answer: was a traceback
    sys.exit(f"stream_check: no service answered on {http}/readyz ({e})")
served = {m["name"]: m for m in json.load(urllib.request.urlopen(http + "/v1/models", timeout=10))["models"]}
print(f"readyz: {ready['status']}, models: {', '.join(sorted(served))}")
names = [only] if only else sorted(n for n in os.listdir(models_dir)
                                   if os.path.isfile(os.path.join(models_dir, n, "reference.json")))
assert names, "no model folder with a reference.json"
failures = 0
for name in names:
    assert name in served, f"{name} is not served"
    ref = json.load(open(os.path.join(models_dir, name, "reference.json")))
    x = ref["x"]  # (T, B, *input_shape), padded to the longest sample
    B = len(x[0])
    lengths = ref.get("lengths") or [len(x)] * B  # variable-length models keep each sample's true length
    for b in range(B):
        T = lengths[b]
        steps = [x[t][b] for t in range(T)]
        with connect(ws_url, open_timeout=10, close_timeout=5) as ws:
            ws.send(json.dumps({"type": "open", "model": name}))
            opened = json.loads(ws.recv(timeout=10))
            assert opened["type"] == "opened", opened
            outs = []
            for i in range(0, T, 10):  # 10 steps a message
                ws.send(json.dumps({"type": "steps", "steps": steps[i:i + 10], "id": i}))
                msg = json.loads(ws.recv(timeout=30))
                assert msg["type"] == "steps" and msg["id"] == i, msg
                outs += msg["outputs"]
            ws.send(json.dumps({"type": "close"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "closed"
        last = outs[-1]
        diff = max(abs(a - e) for a, e in zip(last["scores"], ref["scores"][b], strict=True))
        ok = len(outs) == T and last["index"] == T - 1 and last["predicted"] == ref["predictions"][b] and diff < 1e-3
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} sample {b}: {T} steps over WS -> predicted {last['predicted']} "
              f"(label {ref['y'][b]}, reference {ref['predictions'][b]}), max |score - reference| {diff:.2e}")
sys.exit(1 if failures else 0)
