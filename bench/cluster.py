"""Replicas (docs/cluster.md): throughput with 1 and 2 Ray Serve replicas, what Ray's proxy adds per message
against a direct connection, and failover time (a replica killed with SIGKILL until its sessions answer
again).

    python bench/cluster.py                      # all of it, the shipped mnist1d-sliding model, ~3 minutes
    python bench/cluster.py --only failover --failover-sessions 1000

Everything runs on this machine (the client too: on 2 cores it competes with the replicas; see
BENCHMARKS.md). Needs redis-server and the cluster extra (ray[serve]).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.service import drive, free_port  # noqa: E402
from scripts.cluster_smoke import descendants, wait_replicas  # noqa: E402

MODEL, INPUT = "mnist1d-sliding", 1


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "exited"
        try:
            if httpx.get(f"http://{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.1)


def service(redis_url: str, replica: str, log: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "PSN_CLUSTER": "1", "PSN_STATE_URL": redis_url, "PSN_REPLICA_ID": replica,
           "PSN_PORT": str(port), "PSN_WORKERS": "1", "PSN_MODEL_DIR": str(ROOT / "exported"),
           "PSN_LOG_LEVEL": os.environ.get("PSN_LOG_LEVEL", "warning")}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    base = f"127.0.0.1:{port}"
    wait_ready(base, proc)
    return base, proc


def ray_app(redis_url: str, replicas: int, log: Path) -> tuple[str, subprocess.Popen, dict]:
    port = free_port()
    env = {**os.environ, "PSN_STATE_URL": redis_url, "PSN_PORT": str(port), "PSN_RAY_REPLICAS": str(replicas),
           "PSN_WORKERS": "1", "PSN_MODEL_DIR": str(ROOT / "exported"), "PSN_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.ray"], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"127.0.0.1:{port}"
    return base, proc, wait_replicas(base, replicas, 180)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(base: str, sessions: int, L: int, duration: float) -> dict:
    return asyncio.run(drive(f"ws://{base}/v1/stream", MODEL, INPUT, sessions, duration, 1.0, 10**9, L, "json"))


async def failover(bases: list[str], sessions: int, kill, steps: int = 20) -> dict:
    """Open ``sessions`` through bases[0], step each ``steps`` times, kill, then time until all answer again
    (each client re-sends its next step through bases[-1] every 50 ms until it is answered)."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=f"http://{bases[0]}", timeout=30, limits=limits) as c:
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> str:
            async with sem:
                sid = (await c.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
                r = await c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.01 * i]] * steps})
                assert r.status_code == 200, r.text
                return sid

        sids = await asyncio.gather(*(one(i) for i in range(sessions)))
    kill()
    t_kill = time.perf_counter()
    answered: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://{bases[-1]}", timeout=30, limits=limits) as c:
        sem = asyncio.Semaphore(64)

        async def again(sid: str) -> None:
            while True:
                try:
                    async with sem:  # not httpx's pool: 1,000 tasks waiting on it cost seconds of client CPU
                        r = await c.post(f"/v1/sessions/{sid}/steps", json={"start": steps, "steps": [[0.5]]})
                    if r.status_code == 200:
                        answered.append(time.perf_counter() - t_kill)
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)

        await asyncio.gather(*(again(s) for s in sids))
        took = sorted(answered)
        answered.clear()
        steps += 1
        t_kill = time.perf_counter()  # the same requests again, the sessions now held: the client's own pace
        await asyncio.gather(*(again(s) for s in sids))
    base = max(answered)
    answered = took
    return {"sessions": sessions, "first_s": round(answered[0], 3), "median_s": round(answered[len(answered) // 2], 3),
            "all_s": round(answered[-1], 3), "same_requests_no_takeover_s": round(base, 3)}


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["throughput", "overhead", "failover"], nargs="*", default=None)
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--failover-sessions", type=int, default=1000)
    args = ap.parse_args()
    only = set(args.only or ["throughput", "overhead", "failover"])
    tmp = Path(tempfile.mkdtemp(prefix="psn-bench-cluster-"))
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{rport}/0"
    results: dict = {}
    try:
        if only & {"throughput", "overhead"}:
            base, proc = service(url, "direct", tmp / "direct.log")
            if "overhead" in only:
                results["direct 1 session x 1 step"] = load(base, 1, 1, args.duration)
            if "throughput" in only:
                results[f"direct {args.sessions} x 16"] = load(base, args.sessions, 16, args.duration)
            stop(proc)
            for n in (1, 2):
                base, proc, _ = ray_app(url, n, tmp / f"ray{n}.log")
                time.sleep(2)
                if "overhead" in only and n == 1:
                    results["ray 1 replica, 1 session x 1 step"] = load(base, 1, 1, args.duration)
                if "throughput" in only:
                    results[f"ray {n} replicas, {args.sessions} x 16"] = load(base, args.sessions, 16, args.duration)
                stop(proc)
        if "failover" in only:
            a, pa = service(url, "A", tmp / "A.log")
            b, pb = service(url, "B", tmp / "B.log")
            results["failover direct (all sessions to B)"] = asyncio.run(
                failover([a, b], args.failover_sessions, lambda: kill_tree(pa.pid)))
            stop(pb)
            base, proc, replicas = ray_app(url, 2, tmp / "rayf.log")
            victim = sorted(replicas)[0]
            results["failover ray (2 replicas, one killed)"] = asyncio.run(
                failover([base], args.failover_sessions, lambda: kill_tree(replicas[victim]["pid"])))
            stop(proc)
    finally:
        redis.kill()
        redis.wait()
    for k, v in results.items():
        print(f"{k}: {json.dumps({x: round(y, 3) if isinstance(y, float) else y for x, y in v.items()})}")


if __name__ == "__main__":
    main()
