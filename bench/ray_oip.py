"""OIP v2 sequences on Ray Serve (docs/cluster.md): what routing a sequence by the id in its body costs
per request, and whether the hand-on holds up right after Serve starts.

    python bench/ray_oip.py                  # latency: /v1 vs OIP sequences (handed on) vs OIP with x-session-id
    python bench/ray_oip.py --starts 10      # also: start Ray Serve 10 times, stream 8 OIP sequences at once

Each start runs ``python -m service.ray`` (2 replicas) on a local redis-server. Latency: one client on a
kept-alive HTTP connection, ``--requests`` one-step requests of each kind, two rounds. Starts: the OIP
check of scripts/cluster-smoke (every request of 8 interleaved sequences answered, outputs equal to /v1)
right after both replicas answer, each request on a new connection; reports the failed starts.
Needs redis-server and the cluster extra (ray[serve]).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.cluster_smoke import oip_sequences, ray_serve  # noqa: E402

MODEL = "japanesevowels-sliding"


def latency(base: str, n: int) -> None:
    def timed(send: Callable[[int], httpx.Response]) -> str:
        took = []
        for i in range(n):
            t0 = time.perf_counter()
            r = send(i)
            took.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        took.sort()
        return f"p50 {statistics.median(took) * 1e3:5.1f} ms  p99 {took[int(n * 0.99)] * 1e3:5.1f} ms"

    def infer(i: int, seq: object) -> dict:
        return {"inputs": [{"name": "steps", "datatype": "FP32", "shape": [1, 1, 12], "data": [0.1] * 12}],
                "parameters": {"sequence_id": seq, "sequence_start": i == 0} if seq else {}}

    with httpx.Client(base_url=f"http://{base}", timeout=30) as c:
        def one_round(rnd: int) -> None:
            sid = c.post("/v1/sessions", json={"model": MODEL}).json()["session_id"]
            url = f"/v2/models/{MODEL}/infer"
            key = {"x-session-id": f"oip:{MODEL}:b{rnd}"}
            kinds: list[tuple[str, Callable[[int], httpx.Response]]] = [
                ("/v1 steps", lambda i: c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.1] * 12]})),
                ("OIP sequence (handed on)", lambda i: c.post(url, json=infer(i, f"a{rnd}"))),
                ("OIP sequence, x-session-id", lambda i: c.post(url, json=infer(i, f"b{rnd}"), headers=key)),
                ("OIP, no sequence", lambda i: c.post(url, json=infer(i, None))),
            ]
            for name, send in kinds:
                print(f"round {rnd + 1}: {name:27} {timed(send)}", flush=True)

        for rnd in range(2):
            one_round(rnd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--starts", type=int, default=0, help="start Ray Serve this many times for the start-up check")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="psn-bench-ray-oip-"))
    with ray_serve(tmp) as (base, _):
        time.sleep(5)
        latency(base, args.requests)
    failed = 0
    for k in range(args.starts):
        with ray_serve(tmp, f"start{k}.log") as (base, _):
            t0 = time.monotonic()
            try:
                problems = oip_sequences(base)
            except httpx.HTTPError as e:
                problems = [f"{type(e).__name__}: {e}"]
            failed += bool(problems)
            print(f"start {k + 1}: {'ok' if not problems else problems} in {time.monotonic() - t0:.1f} s", flush=True)
    if args.starts:
        print(f"{failed} of {args.starts} starts failed the OIP check (logs: {tmp})")


if __name__ == "__main__":
    main()
