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
import importlib.util
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
from bench.overload import HTTPConn, post_head  # noqa: E402
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
           "PSN_WORKERS": "1", "PSN_MODEL_DIR": str(ROOT / "exported"), "PSN_LOG_LEVEL": "warning",
           "PSN_MAX_SESSIONS": "4096"}  # 2,000 sessions need not hash evenly
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


async def failover(bases: list[str], sessions: int, kill, steps: int = 20, settle=None,
                   victim: str | None = None) -> dict:
    """Open ``sessions`` through bases[0], step each ``steps`` times, kill, then time until all answer again
    (each client re-sends its next step through bases[-1] every 50 ms until it is answered). Then the same
    requests again with nothing to take over, for the client's own pace; ``settle`` (blocking) first waits
    for a replacement replica, and one untimed round lets the sessions it takes move there. ``victim``
    (a Ray replica id): only the sessions that replica answered re-send, as only their clients see the
    failure (the others' clients stay idle meanwhile)."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=f"http://{bases[0]}", timeout=30, limits=limits) as c:
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> tuple[str, str | None]:
            async with sem:
                sid = (await c.post("/v1/sessions", json={"model": MODEL})).json()["session_id"]
                r = await c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.01 * i]] * steps})
                assert r.status_code == 200, r.text
                return sid, r.headers.get("x-psn-replica")

        held = await asyncio.gather(*(one(i) for i in range(sessions)))
    sids = [sid for sid, where in held if victim is None or where == victim]
    kill()
    t_kill = time.perf_counter()
    took = await resend(bases[-1], sids, steps, t_kill)
    if settle is not None:
        await asyncio.to_thread(settle)
        await resend(bases[-1], sids, steps + 1, time.perf_counter())
        steps += 1
    # the same requests again, the sessions now held: what the client alone takes for them
    base = await resend(bases[-1], sids, steps + 1, time.perf_counter())
    return {"sessions": sessions, "re_sent": len(sids), "first_s": round(took[0], 3),
            "median_s": round(took[len(took) // 2], 3), "all_s": round(took[-1], 3),
            "same_requests_no_takeover_s": round(base[-1], 3)}


async def resend(base: str, sids: list[str], start: int, t0: float, conns: int = 64) -> list[float]:
    """Each session's step ``start``, sent over ``conns`` kept-alive connections (raw HTTP/1.1: httpx's CPU per
    request made the client the bottleneck), a refused or failed one again 50 ms later, until every session
    has answered; returns the seconds from ``t0`` to each answer, sorted."""
    port = int(base.rsplit(":", 1)[1])
    pending: asyncio.Queue[str] = asyncio.Queue()
    for sid in sids:
        pending.put_nowait(sid)
    answered: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    body = json.dumps({"start": start, "steps": [[0.5]]}).encode()

    async def worker() -> None:
        conn = HTTPConn(port)
        try:
            while True:
                sid = await pending.get()
                try:
                    status, _ = await conn.request(post_head(f"/v1/sessions/{sid}/steps", len(body)) + body)
                except (OSError, asyncio.IncompleteReadError):
                    status = 0
                if status == 200:
                    answered.append(time.perf_counter() - t0)
                    if len(answered) == len(sids):
                        done.set()
                else:
                    loop.call_later(0.05, pending.put_nowait, sid)
        finally:
            conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(conns)]
    try:
        await asyncio.wait_for(done.wait(), 120)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return sorted(answered)


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
    have_ray = importlib.util.find_spec("ray") is not None
    if not have_ray:
        print("ray is not installed (pip install -e '.[cluster]'): measuring direct connections only", flush=True)
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
            for n in (1, 2) if have_ray else ():
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
            if have_ray:
                base, proc, replicas = ray_app(url, 2, tmp / "rayf.log")
                victim = sorted(replicas)[0]
                results["failover ray (2 replicas, one killed)"] = asyncio.run(failover(
                    [base], args.failover_sessions, lambda: kill_tree(replicas[victim]["pid"]),
                    settle=lambda: wait_replicas(base, 2, 120)))  # the killed one cannot answer: its replacement
                stop(proc)
                # only the killed replica's sessions re-send (their clients alone see a failure), with twice
                # the sessions opened, so that about --failover-sessions of them were on it
                base, proc, replicas = ray_app(url, 2, tmp / "rayv.log")
                victim = sorted(replicas)[0]
                results["failover ray, only the killed replica's sessions re-send"] = asyncio.run(failover(
                    [base], 2 * args.failover_sessions, lambda: kill_tree(replicas[victim]["pid"]),
                    settle=lambda: wait_replicas(base, 2, 120), victim=victim))
                stop(proc)
    finally:
        redis.kill()
        redis.wait()
    for k, v in results.items():
        print(f"{k}: {json.dumps({x: round(y, 3) if isinstance(y, float) else y for x, y in v.items()})}")


if __name__ == "__main__":
    main()
