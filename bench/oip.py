"""Per-request cost of OIP infer (binary tensors, a Triton sequence) against the /v1 HTTP steps route,
same input, same server, one client, requests interleaved (issue 13's target: within 1.2x).

    python bench/oip.py                      # 2,000 requests of 16 steps each per route
    python bench/oip.py --steps 1 --requests 5000 --json out.json

The server is ``python -m service`` on 127.0.0.1 with the bench net (28-128-128-10 sliding PSN, k=8,
untrained); the client is httpx on a kept-alive connection. Reported: median and p99 wall time per
request, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service import free_port, make_model, start  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16, help="steps per request")
    ap.add_argument("--requests", type=int, default=2000, help="per route")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    L = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp))
        model = "bench-28-128-128-10-sliding-k8"
        port = free_port()
        proc = start("service", port, model_dir, {"PSN_MAX_WAIT_MS": "0"}, (28, 128, 10))
        try:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((L, 28), dtype=np.float32)
            v1_body = json.dumps({"steps": x.astype(np.float64).round(6).tolist()})
            head = json.dumps({"inputs": [{"name": "steps", "shape": [1, L, 28], "datatype": "FP32",
                                           "parameters": {"binary_data_size": 4 * L * 28}}],
                               "parameters": {"sequence_id": 1, "binary_data_output": True}}).encode()
            oip_body = head + x.astype("<f4").tobytes()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                sid = c.post("/v1/sessions", json={"model": model}).json()["session_id"]
                start_head = json.dumps({"inputs": json.loads(head)["inputs"], "parameters": {
                    "sequence_id": 1, "sequence_start": True, "binary_data_output": True}}).encode()
                r = c.post(f"/v2/models/{model}/infer", content=start_head + x.astype("<f4").tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(start_head))})
                assert r.status_code == 200, r.text
                v1_t, oip_t = [], []
                for _ in range(args.requests):  # interleaved
                    t0 = time.perf_counter()
                    r1 = c.post(f"/v1/sessions/{sid}/steps", content=v1_body,
                                headers={"content-type": "application/json"})
                    t1 = time.perf_counter()
                    r2 = c.post(f"/v2/models/{model}/infer", content=oip_body,
                                headers={"Inference-Header-Content-Length": str(len(head))})
                    t2 = time.perf_counter()
                    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
                    v1_t.append(t1 - t0)
                    oip_t.append(t2 - t1)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def p(ts: list[float], q: float) -> float:
        return sorted(ts)[min(len(ts) - 1, int(q * len(ts)))] * 1e3

    out = {"steps_per_request": L, "requests": args.requests, "v1_median_ms": statistics.median(v1_t) * 1e3,
           "v1_p99_ms": p(v1_t, 0.99), "oip_median_ms": statistics.median(oip_t) * 1e3, "oip_p99_ms": p(oip_t, 0.99),
           "cores": os.cpu_count()}
    out["ratio"] = out["oip_median_ms"] / out["v1_median_ms"]
    print(f"# OIP infer (binary tensors, a sequence) vs /v1 steps (JSON), {L} steps/request, "
          f"{args.requests} requests each, load average {os.getloadavg()[0]:.1f}")
    print("| route | median ms | p99 ms |\n| --- | --- | --- |")
    print(f"| /v1/sessions/{{id}}/steps (JSON) | {out['v1_median_ms']:.3f} | {out['v1_p99_ms']:.3f} |")
    print(f"| /v2/models/{{name}}/infer (binary) | {out['oip_median_ms']:.3f} | {out['oip_p99_ms']:.3f} |")
    print(f"ratio of medians (OIP / v1): {out['ratio']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
