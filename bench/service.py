"""The real service against a no-op WebSocket endpoint of the same message shape, same clients.

    python bench/service.py                                   # 64 and 256 sessions, 5 s each, JSON, 1 step
    python bench/service.py --frame binary --steps-per-message 16 --sessions 256 --json out.json
    python bench/service.py --sessions 64 --duration 3 --model-dir exported

Starts three servers, one at a time, each as its own process on 127.0.0.1: the no-op endpoint
(``--noop-server``: answers every ``steps`` message with outputs of the right shape, no model, no
batching; with ``--workers`` uvicorn worker processes, like the service's front ends), the service
(``python -m service``: engine core + ``--workers`` front ends), and (``--unbatched``) the service
with ``PSN_MAX_BATCH_SIZE=1``. All run at once (idle ones cost nothing); the same client process
drives each in turn, in interleaved rounds (``--rounds``, medians reported), with N concurrent
WebSocket sessions, ``--steps-per-message`` steps per message as JSON or binary frames (``--frame``),
each client waiting for its answer before sending the next (bounded by ``--duration`` seconds and
``--max-messages`` per client). ``--json PATH`` writes the figures of the last session count.
Prints session-steps/s, p50/p99 latency, and the ratios service/no-op and batched/unbatched.
The default model is a 28-128-128-10 sliding
PSN (k=8, untrained) written to a temporary folder; ``--model-dir`` serves other folders (the first
streaming model is driven).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----- the no-op server ------------------------------------------------------------------------
def noop_app(input_size: int, out_size: int, classes: int) -> FastAPI:
    app = FastAPI()
    header, answer_header = struct.Struct("<IIq"), struct.Struct("<IIqIIII")
    nb = (out_size + 7) // 8

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        binary = "psn.binary.v1" in ws.scope.get("subprotocols", ())
        await ws.accept(subprotocol="psn.binary.v1" if binary else None)
        sid = "noop-session"
        t = 0
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("bytes") is not None:  # a binary steps frame: answer with a frame of the right size
                    data = msg["bytes"]
                    msg_id, L, _ = header.unpack_from(data)
                    np.frombuffer(data, np.float32, offset=header.size)
                    await ws.send_bytes(answer_header.pack(msg_id, L, t, 0, out_size, classes, nb)
                                        + bytes(L * (4 * classes + 4 + nb)))
                    t += L
                    continue
                msg = json.loads(msg["text"])
                if msg["type"] == "open":
                    await ws.send_text(json.dumps({"type": "opened", "session": {"session_id": sid}}))
                    continue
                if msg["type"] != "steps":
                    continue
                steps = msg["steps"]
                outputs = []
                for _ in steps:
                    outputs.append({"index": t, "spikes": [0] * out_size, "scores": [0.0] * classes,
                                    "predicted": 0, "label": "0"})
                    t += 1
                await ws.send_text(json.dumps({"type": "steps", "session_id": sid, "id": msg.get("id"),
                                               "start": t - len(steps), "replayed": 0, "outputs": outputs}))
        except WebSocketDisconnect:
            pass

    return app


def noop_factory() -> FastAPI:
    """For uvicorn's worker processes: sizes from PSN_NOOP_SIZES."""
    return noop_app(*map(int, os.environ["PSN_NOOP_SIZES"].split(",")))


# ----- clients ---------------------------------------------------------------------------------
async def client(url: str, model: str, input_size: int, stop_at: list[float], max_messages: int,
                 done_at: list[float], latencies: list[float], start_gate: asyncio.Event, seed: int,
                 L: int = 1, frame: str = "json") -> int:
    """One session: open, then ``L`` steps per message until ``stop_at[0]``; close. Records latencies."""
    import websockets

    rng = random.Random(seed)
    binary = frame == "binary"
    async with websockets.connect(url, max_size=None, subprotocols=["psn.binary.v1"] if binary else None) as ws:
        await ws.send(json.dumps({"type": "open", "model": model}))
        opened = json.loads(await ws.recv())
        if opened["type"] != "opened":
            raise RuntimeError(f"open failed: {opened}")
        n = 0
        head = struct.Struct("<IIq")
        pool = []  # messages made before timing starts (the client must not be the bottleneck)
        for _ in range(8):
            steps = [[round(rng.gauss(0, 1), 4) for _ in range(input_size)] for _ in range(L)]
            pool.append(np.asarray(steps, "<f4").tobytes() if binary else json.dumps({"type": "steps", "steps": steps}))
        await start_gate.wait()
        while n < max_messages and time.perf_counter() < stop_at[0]:
            msg = head.pack(n, L, -1) + pool[n % 8] if binary else pool[n % 8]
            t0 = time.perf_counter()
            await ws.send(msg)
            ans = await ws.recv()
            t1 = time.perf_counter()
            if binary and not isinstance(ans, bytes) or not binary and json.loads(ans)["type"] != "steps":
                raise RuntimeError(f"step failed: {ans!r}")
            latencies.append(t1 - t0)
            done_at.append(t1)
            n += 1
        await ws.send(json.dumps({"type": "close"}))
        return n


async def drive(url: str, model: str, input_size: int, sessions: int, duration: float, warmup: float,
                max_messages: int, L: int = 1, frame: str = "json") -> dict:
    """``sessions`` concurrent clients for ``duration`` s (after a short warm-up with up to 16)."""
    gate = asyncio.Event()
    gate.set()
    stop = [time.perf_counter() + warmup]
    await asyncio.gather(*(client(url, model, input_size, stop, max_messages, [], [], gate, i, L, frame)
                           for i in range(min(sessions, 16))))
    lat: list[float] = []
    done_at: list[float] = []
    gate = asyncio.Event()
    stop = [float("inf")]
    tasks = [asyncio.create_task(client(url, model, input_size, stop, max_messages, done_at, lat, gate, i, L, frame))
             for i in range(sessions)]
    await asyncio.sleep(0.5 + sessions * 0.004)  # let every client open its session
    t0 = time.perf_counter()
    stop[0] = t0 + duration
    gate.set()
    await asyncio.gather(*tasks)
    count = sum(1 for t in done_at if t <= stop[0])
    lat.sort()
    return {"steps_per_s": count * L / duration, "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, "messages": len(lat)}


LOADGEN = ROOT / "bench" / "loadgen"


class HealthProbe:
    """GET /healthz every 20 ms from a thread while the load runs; ``stop()`` returns the p99 in ms."""

    def __init__(self, url: str):
        import threading

        self.url, self.lat, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as c:
            while not self._stop.wait(0.02):
                t0 = time.perf_counter()
                c.get(self.url)
                self.lat.append(time.perf_counter() - t0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        lat = sorted(self.lat)
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan")


def node_available() -> bool:
    return shutil.which("node") is not None and (LOADGEN / "node_modules" / "ws").is_dir()


def node_drive(url: str, model: str, input_size: int, sessions: int, duration: float, warmup: float, L: int,
               frame: str) -> dict:
    """The same clients as ``drive``, run by bench/loadgen/loadgen.mjs (one Node.js process)."""
    out = subprocess.run(["node", str(LOADGEN / "loadgen.mjs"), url, model, str(input_size), str(sessions), str(L),
                          frame, str(duration), str(warmup)], capture_output=True, text=True, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children, living and reaped (Linux /proc)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *children(k)]
    return out


# ----- servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def start(kind: str, port: int, model_dir: Path, env_extra: dict[str, str], sizes: tuple[int, int, int],
          workers: int = 1):
    env = {**os.environ, "PSN_MODEL_DIR": str(model_dir), "PSN_PORT": str(port), "PSN_HOST": "127.0.0.1",
           "PSN_LOG_LEVEL": "warning", "PSN_TORCH_THREADS": "1", "PYTHONPATH": str(ROOT), "PSN_WORKERS": str(workers),
           **env_extra}
    if kind == "noop":
        cmd = [sys.executable, __file__, "--noop-server", "--port", str(port), "--sizes", *map(str, sizes),
               "--workers", str(workers)]
    else:
        cmd = [sys.executable, "-m", "service"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    wait_port(port, proc)
    if kind != "noop":  # the port is bound at once; the engine core (models, a session log) takes longer
        import httpx

        deadline = time.monotonic() + 120
        while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service on port {port} did not become ready")
            time.sleep(0.1)
    time.sleep(0.3)
    return proc


def make_model(root: Path) -> Path:
    import torch

    from model.folder import save_model_folder
    from model.network import LayerConfig, NetConfig, PSNNet

    torch.manual_seed(0)
    cfg = NetConfig(input_shape=(28,), num_classes=10, layers=(LayerConfig(out=128), LayerConfig(out=128)),
                    neuron="sliding", k=8)
    save_model_folder(root / "bench-28-128-128-10-sliding-k8", PSNNet(cfg).eval(), dataset="")
    return root


def pick_model(model_dir: Path) -> tuple[str, int, int, int]:
    import math

    from model.folder import find_model_folders, read_config
    from model.network import NetConfig, PSNNet

    for folder in find_model_folders(model_dir):
        conf = read_config(folder)
        cfg = NetConfig.from_dict(conf["net"])
        if cfg.streams and cfg.neuron != "masked" and len(cfg.input_shape) == 1:
            out = math.prod(PSNNet(cfg).out_shape)
            return conf.get("name", folder.name), cfg.input_shape[0], out, cfg.num_classes
    raise SystemExit(f"no sliding/LIF model with 1-D input under {model_dir}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per session count (median)")
    ap.add_argument("--max-messages", type=int, default=100_000, help="per client")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--max-wait-ms", type=float, default=None,
                    help="PSN_MAX_WAIT_MS of the batched service (default: the service's default)")
    ap.add_argument("--frame", choices=["json", "binary"], default="json")
    ap.add_argument("--steps-per-message", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="front-end processes of the service and of the no-op")
    ap.add_argument("--unbatched", action="store_true", help="also run the service with PSN_MAX_BATCH_SIZE=1")
    ap.add_argument("--logging", action="store_true",
                    help="also run the service with its session log on (PSN_STATE_DIR in a temporary folder) and "
                         "report logged / unlogged throughput (issue 11's target: >= 0.9x)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:PSN_X=V[,PSN_Y=W]",
                    help="also run the service with these settings (repeatable), reported against the service "
                         "with its defaults, e.g. --variant 'malloc defaults:PSN_MALLOC_KEEP_MB=0'")
    ap.add_argument("--json", type=Path, default=None, help="write the last session count's figures here")
    ap.add_argument("--client", choices=["auto", "node", "python"], default="auto",
                    help="load generator: bench/loadgen (Node.js + ws, `npm ci` there; 3-8x faster than the "
                         "Python client on the same cores) or the Python client; auto: node if installed")
    ap.add_argument("--noop-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.noop_server:
        import uvicorn

        os.environ["PSN_NOOP_SIZES"] = ",".join(map(str, args.sizes))
        uvicorn.run("bench.service:noop_factory", factory=True, host="127.0.0.1", port=args.port,
                    log_level="warning", workers=args.workers,
                    ws_per_message_deflate=os.environ.get("PSN_WS_COMPRESSION", "false").lower() in ("1", "true"))
        return

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_model(Path(tmp))
        model, input_size, out_size, classes = pick_model(model_dir)
        wait = {} if args.max_wait_ms is None else {"PSN_MAX_WAIT_MS": str(args.max_wait_ms)}
        runs = [("no-op", "noop", {}), ("service", "service", wait)]
        if args.unbatched:
            runs.append(("service, max_batch_size=1", "service", {"PSN_MAX_BATCH_SIZE": "1", "PSN_MAX_WAIT_MS": "0"}))
        if args.logging:
            runs.append(("service, session log", "service", {**wait, "PSN_STATE_DIR": str(Path(tmp) / "state")}))
        variants = []
        for spec in args.variant:
            label, _, settings = spec.partition(":")
            pairs = [kv.partition("=") for kv in settings.split(",") if kv]
            if not label or not pairs or any(not k.startswith("PSN_") or not eq for k, eq, _ in pairs):
                raise SystemExit(f"--variant {spec!r}: expected LABEL:PSN_X=V[,PSN_Y=W]")
            variants.append(f"service, {label}")
            runs.append((variants[-1], "service", {**wait, **{k: v for k, _, v in pairs}}))
        L, frame = args.steps_per_message, args.frame
        node = args.client == "node" or (args.client == "auto" and node_available())
        print(f"# service bench: {os.cpu_count()} cores, model {model} (input {input_size}, spikes {out_size}, "
              f"{classes} classes), {frame} frames, {L} steps/message, {args.workers} front-end worker(s), "
              f"{args.duration:g} s per run, {'Node.js' if node else 'Python'} clients and server on 127.0.0.1, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results: dict[tuple[str, int], list[dict]] = {}
        procs, ports = [], {}
        try:
            for label, kind, env in runs:  # all up at once; idle ones cost nothing
                port = free_port()
                procs.append(start(kind, port, model_dir, {**env, "PSN_MAX_SESSIONS": str(4 * max(args.sessions))},
                                   (input_size, out_size, classes), args.workers))
                ports[label] = port
            for n in args.sessions:
                for rnd in range(args.rounds):  # interleaved, so a noisy neighbour hits all three alike
                    for i, (label, kind, _) in enumerate(runs):
                        cpu0 = cpu_seconds(procs[i].pid)
                        url = f"ws://127.0.0.1:{ports[label]}/v1/stream"
                        probe = HealthProbe(f"http://127.0.0.1:{ports[label]}/healthz") if kind != "noop" else None
                        r = (node_drive(url, model, input_size, n, args.duration, args.warmup, L, frame) if node else
                             asyncio.run(drive(url, model, input_size, n, args.duration, args.warmup,
                                               args.max_messages, L, frame)))
                        r["server_cpu_us"] = (cpu_seconds(procs[i].pid) - cpu0) / (r["messages"] * L) * 1e6
                        r["healthz_p99_ms"] = probe.stop() if probe is not None else float("nan")
                        results.setdefault((label, n), []).append(r)
                        print(f"  round {rnd + 1} {label:28s} {n:4d} sessions: {r['steps_per_s']:9,.0f} "
                              f"session-steps/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                              f"server CPU {r['server_cpu_us']:5.1f} us/step  /healthz p99 "
                              f"{r['healthz_p99_ms']:.1f} ms", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)

        def med(label: str, n: int, key: str) -> float:
            return statistics.median(r[key] for r in results[(label, n)])

        print("\n| sessions | no-op steps/s | service steps/s | ratio | no-op p50/p99 ms | service p50/p99 ms "
              "| p99 ratio | server CPU us/step no-op / service |" + (" max_batch_size=1 steps/s | batched/unbatched |"
                                                                       if args.unbatched else ""))
        print("| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if args.unbatched else ""))
        print(f"(medians of {args.rounds} rounds)")
        keys = ("steps_per_s", "p50_ms", "p99_ms", "server_cpu_us", "healthz_p99_ms")
        summary = {}
        for n in args.sessions:
            a, b = ({k: med(label, n, k) for k in keys} for label in ("no-op", "service"))
            line = (f"| {n} | {a['steps_per_s']:,.0f} | {b['steps_per_s']:,.0f} | "
                    f"{b['steps_per_s'] / a['steps_per_s']:.2f}x | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
                    f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {b['p99_ms'] / a['p99_ms']:.2f}x | "
                    f"{a['server_cpu_us']:.1f} / {b['server_cpu_us']:.1f} |")
            if args.unbatched:
                c = {k: med("service, max_batch_size=1", n, k) for k in keys}
                line += f" {c['steps_per_s']:,.0f} | {b['steps_per_s'] / c['steps_per_s']:.2f}x |"
            print(line)
            summary = {"session_steps_per_s": b["steps_per_s"], "noop_session_steps_per_s": a["steps_per_s"],
                       "ratio": b["steps_per_s"] / a["steps_per_s"], "p50_ms": b["p50_ms"], "p99_ms": b["p99_ms"],
                       "noop_p50_ms": a["p50_ms"], "noop_p99_ms": a["p99_ms"], "workers": args.workers,
                       "steps_per_message": L, "frame": frame, "sessions": n, "rounds": args.rounds,
                       "duration_s": args.duration, "cores": os.cpu_count(),
                       "server_cpu_us_per_step": b["server_cpu_us"], "healthz_p99_ms": b["healthz_p99_ms"]}
            if args.logging:
                d = {k: med("service, session log", n, k) for k in keys}
                print(f"  {n} sessions, session log on: {d['steps_per_s']:,.0f} session-steps/s = "
                      f"{d['steps_per_s'] / b['steps_per_s']:.2f}x of log off (p50/p99 {d['p50_ms']:.1f} / "
                      f"{d['p99_ms']:.1f} ms, server CPU {d['server_cpu_us']:.1f} us/step)")
                summary.update(logged_session_steps_per_s=d["steps_per_s"],
                               logged_ratio=d["steps_per_s"] / b["steps_per_s"], logged_p99_ms=d["p99_ms"])
            for label in variants:
                d = {k: med(label, n, k) for k in keys}
                print(f"  {n} sessions, {label}: {d['steps_per_s']:,.0f} session-steps/s = "
                      f"{d['steps_per_s'] / b['steps_per_s']:.2f}x of the service's defaults (p50/p99 "
                      f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f} ms, server CPU {d['server_cpu_us']:.1f} us/step)")
                summary.setdefault("variants", {})[label] = d
        if args.json is not None:
            args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
