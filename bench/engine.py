"""The engine alone (no HTTP): batched against one-by-one stepping of many sessions.

    python bench/engine.py                                   # CPU, 256 sessions, one step each
    python bench/engine.py --device cuda --sessions 1024 16384 131072 --cuda-graphs

On CUDA, "batched" is the backend's ``run`` (host input copied in, outputs copied out, spikes as
bytes), "device step" the same step with inputs and outputs left on the device, "CUDA graph" that
step captured once and replayed.

The net is a 28-128-128-10 sliding PSN (k=8, untrained, batch norm folded), float32. Two levels:

- backend: ``TorchBackend.run`` over all sessions' slots at once (gather, one step, scatter) against
  one ``run`` per session;
- engine (``--engine``, CPU default on): the asyncio ``ModelEngine`` with its batcher, every session
  awaiting one step concurrently, with ``max_batch_size = sessions`` against ``max_batch_size = 1``
  (futures and JSON-ready outputs included; batches inline on CPU, in a thread on GPU, as the service).

On CUDA the state-byte floor (read and write every session's state once per step) is printed using
``--bandwidth-gbs`` (default: the H200 copy bandwidth in DESIGN.md). Times are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.folder import LoadedModel  # noqa: E402
from model.network import LayerConfig, NetConfig, PSNNet, state_size_bytes  # noqa: E402
from service.backends.torch_backend import TorchBackend  # noqa: E402
from service.engine.inline import InlineExecutor  # noqa: E402
from service.engine.model_engine import ModelEngine  # noqa: E402
from service.engine.sessions import SessionTable  # noqa: E402
from service.metrics import Metrics  # noqa: E402


def bench_model(device: torch.device) -> LoadedModel:
    torch.manual_seed(0)
    cfg = NetConfig(input_shape=(28,), num_classes=10, layers=(LayerConfig(out=128), LayerConfig(out=128)),
                    neuron="sliding", k=8)
    net = PSNNet(cfg).eval().fused().to(device)
    return LoadedModel(name="bench-28-128-128-10-sliding-k8", path=Path("."), net=net,
                       config={"net": cfg.to_dict(), "class_names": [str(i) for i in range(10)]})


def timed(fn: Callable[[], object], repeat: int, sync: Callable[[], None], warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def backend_rows(model: LoadedModel, sessions: int, repeat: int, one_by_one: bool, graphs: bool) -> dict:
    dev = model.net.readout.weight.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    be = TorchBackend(model, sessions)
    x = torch.randn(1, sessions, 28)
    slots = torch.arange(sessions)
    row = {"sessions": sessions, "batched_ms": timed(lambda: be.run(x, slots), repeat, sync) * 1e3}
    if dev.type == "cuda":  # the step alone: inputs already on the device, outputs left there
        xd, idx = x.to(dev), slots.to(dev)
        row["device_ms"] = timed(lambda: be.step_device(xd, idx), repeat, sync) * 1e3
        if graphs:
            row["graph_ms"] = cuda_graph_step(be, xd, idx, repeat)
    if one_by_one:
        xs = [x[:, i:i + 1] for i in range(sessions)]
        ss = [slots[i:i + 1] for i in range(sessions)]

        def each() -> None:
            for xi, si in zip(xs, ss, strict=True):
                be.run(xi, si)

        row["one_by_one_ms"] = timed(each, max(3, repeat // 10), sync, warmup=1) * 1e3
    return row


def cuda_graph_step(be: TorchBackend, x: torch.Tensor, idx: torch.Tensor, repeat: int) -> float:
    """``step_device`` of every slot captured once as a CUDA graph and replayed (no launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            be.step_device(x, idx)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        be.step_device(x, idx)
    return timed(g.replay, repeat, torch.cuda.synchronize) * 1e3


async def engine_rate(model: LoadedModel, sessions: int, max_batch: int, rounds: int) -> float:
    """Session-steps/s of the asyncio engine: every session (a task) awaits ``rounds`` steps, one at a time."""
    cpu = model.net.readout.weight.device.type == "cpu"
    executor = InlineExecutor() if cpu else ThreadPoolExecutor(max_workers=1)  # as PSN_ENGINE_THREAD=auto
    me = ModelEngine(TorchBackend(model, sessions), executor, Metrics(), max_batch_size=max_batch, max_wait_s=0,
                     queue_depth=sessions * 2)
    table = SessionTable(3600, 4, 0)
    table.add_model(me.name, sessions)
    ss = [table.open(me.name) for _ in range(sessions)]
    me.batcher.start()
    xs = list(torch.randn(sessions, 1, 28).unbind(0))  # one (1, 28) step per session

    async def client(s, x, n: int) -> None:  # one task per session, like one per connection
        for _ in range(n):
            await me.step(s, x, None)

    await asyncio.gather(*(client(s, x, 1) for s, x in zip(ss, xs, strict=True)))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(client(s, x, rounds) for s, x in zip(ss, xs, strict=True)))
    rate = sessions * rounds / (time.perf_counter() - t0)
    await me.batcher.drain(1)
    executor.shutdown()
    return rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sessions", type=int, nargs="+", default=[256])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1, as the service; 0 = torch's default)")
    ap.add_argument("--no-one-by-one", action="store_true", help="skip the one-by-one baselines (backend and engine)")
    ap.add_argument("--engine", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the asyncio engine (default: on for CPU)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--bandwidth-gbs", type=float, default=4152.0)
    args = ap.parse_args(argv)
    try:  # the service runs on uvloop (uvicorn[standard]); so does this
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = bench_model(device)
    per_session = state_size_bytes(model.net)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"# engine bench: {name}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), 28-128-128-10 sliding PSN k=8 float32, "
          f"state {per_session} B/session, load average {os.getloadavg()[0]:.1f}")
    cuda_cols = " device step ms | CUDA graph ms | state-byte floor ms | graph / floor |"
    print("| sessions | batched ms/step | session-steps/s | one-by-one ms | one-by-one steps/s | speed-up |"
          + (cuda_cols if device.type == "cuda" else ""))
    print("| --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- | --- |" if device.type == "cuda" else ""))
    for n in args.sessions:
        row = backend_rows(model, n, args.repeat, not args.no_one_by_one and n <= 4096, args.cuda_graphs)
        b = row["batched_ms"]
        o = row.get("one_by_one_ms")
        line = (f"| {n} | {b:.3f} | {n / b * 1e3:,.0f} | "
                + (f"{o:.1f} | {n / o * 1e3:,.0f} | {o / b:.1f}x |" if o else "- | - | - |"))
        if device.type == "cuda":
            floor = 2 * per_session * n / (args.bandwidth_gbs * 1e9) * 1e3
            g = row.get("graph_ms", float("nan"))
            line += f" {row['device_ms']:.3f} | {g:.3f} | {floor:.3f} | {g / floor:.2f}x |"
        print(line, flush=True)
    if args.engine if args.engine is not None else device.type == "cpu":
        print("\n| sessions | engine max_batch=N steps/s | engine max_batch=1 steps/s | speed-up |")
        print("| --- | --- | --- | --- |")
        for n in args.sessions:
            batched = asyncio.run(engine_rate(model, n, n, args.rounds))
            if args.no_one_by_one:
                print(f"| {n} | {batched:,.0f} | - | - |", flush=True)
                continue
            single = asyncio.run(engine_rate(model, n, 1, max(2, args.rounds // 5)))
            print(f"| {n} | {batched:,.0f} | {single:,.0f} | {batched / single:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
