"""The engine alone (no HTTP): batched against one-by-one stepping of many sessions.

    python bench/engine.py                                   # CPU, 256 sessions, one step each
    python bench/engine.py --device cuda --sessions 1024 16384 131072 --cuda-graphs

On CUDA, "batched" is the backend's ``run`` (host input copied in, outputs copied out, spikes as
bytes), "device step" the same step with inputs and outputs left on the device, "CUDA graph" that
step captured once and replayed.

The net is a 28-128-128-10 sliding PSN (k=8, untrained, batch norm folded), float32. Two levels:

- backend: ``TorchBackend.run`` over all sessions' slots at once (gather, one step, scatter) against
  one ``run`` per session;
- engine core (``--engine``, CPU default on): ``service.core.engine.EngineCore`` as the engine-core
  process runs it, minus the socket: each round every session sends one request of
  ``--steps-per-request`` steps (msgpack-decoded as they arrive), the loop runs engine steps until
  all are answered, and the answers are msgpack-encoded per front end. Reported against the backend
  call alone (``TorchBackend.run``) on batches of the same shape (``max_batch_size`` sessions x L).

``python bench/engine.py --json PATH`` with no other flags runs the issue-10 configuration (CPU,
1,024 sessions x 16 steps per request, engine core only) and writes ``us_per_session_step``,
``backend_us_per_session_step`` and ``us_per_request`` to PATH.

On CUDA the state-byte floor (read and write every session's state once per step) is printed using
``--bandwidth-gbs`` (default: the H200 copy bandwidth in DESIGN.md). Times are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.folder import LoadedModel  # noqa: E402
from model.network import LayerConfig, NetConfig, PSNNet, state_size_bytes  # noqa: E402
from service.backends.torch_backend import TorchBackend  # noqa: E402
from service.memory import keep_freed_memory  # noqa: E402


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


def engine_core_rate(model: LoadedModel, sessions: int, L: int, max_batch: int, rounds: int) -> dict:
    """Microseconds per session-step and per request of the engine core, and of the backend call alone."""
    import msgpack
    import numpy as np

    from service.config import Settings
    from service.core.engine import EngineCore

    settings = Settings(max_sessions=sessions, max_batch_size=max_batch, max_wait_ms=0, queue_depth=4 * sessions,
                        warmup=False, idle_timeout_s=3600)
    core = EngineCore([TorchBackend(model, sessions)], settings)
    front = b"front-0"
    sids = []
    for i in range(sessions):
        core.handle(front, [i + 1, "open", model.name, False])
    for _rid, status, info in core.take_outbox()[front]:
        assert status == 0, info
        sids.append(info["session_id"])
    rng = np.random.default_rng(0)
    payloads = [rng.standard_normal((L, 28), dtype=np.float32).tobytes() for _ in range(sessions)]
    # what a front end sends: its requests of one loop turn in one message (here: 64 per message)
    messages = [msgpack.packb([[k + 1, "steps", sids[k], -1, L, payloads[k]] for k in range(i, min(i + 64, sessions))])
                for i in range(0, sessions, 64)]

    def one_round() -> None:
        for m in messages:
            for req in msgpack.unpackb(m):
                core.handle(front, req)
        while core.has_work():
            core.step()
        for items in core.take_outbox().values():
            msgpack.packb(items)

    be = core.runners[model.name].backend
    xs = [torch.randn(L, min(max_batch, sessions - i), 28) for i in range(0, sessions, max_batch)]
    slots = [torch.arange(i, i + x.shape[1]) for i, x in zip(range(0, sessions, max_batch), xs, strict=True)]

    def backend_round() -> None:
        for x, sl in zip(xs, slots, strict=True):
            be.run(x, sl)

    one_round()
    backend_round()
    engine_t, backend_t = [], []
    for _ in range(rounds):  # interleaved, so a noisy neighbour slows both alike; medians
        t0 = time.perf_counter()
        one_round()
        t1 = time.perf_counter()
        backend_round()
        engine_t.append(t1 - t0)
        backend_t.append(time.perf_counter() - t1)
    engine_s, backend_s = statistics.median(engine_t), statistics.median(backend_t)
    n = sessions * L
    return {"us_per_session_step": engine_s / n * 1e6, "backend_us_per_session_step": backend_s / n * 1e6,
            "us_per_request": engine_s / sessions * 1e6, "sessions": sessions, "steps_per_request": L,
            "max_batch_size": max_batch, "ratio": engine_s / backend_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sessions", type=int, nargs="+", default=[256])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1, as the service; 0 = torch's default)")
    ap.add_argument("--no-one-by-one", action="store_true", help="skip the one-by-one baselines (backend and engine)")
    ap.add_argument("--engine", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the engine core (default: on for CPU)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps-per-request", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-batch-size", type=int, default=256, help="the engine core's (the service default)")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the engine-core figures as JSON (alone: CPU, 1,024 sessions x 16 steps, engine only)")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--malloc-keep-mb", type=int, default=256,
                    help="as PSN_MALLOC_KEEP_MB in the engine core process (0: glibc's defaults)")
    ap.add_argument("--bandwidth-gbs", type=float, default=4152.0)
    args = ap.parse_args(argv)
    only_json = args.json is not None and argv is None and len(sys.argv) == 3
    if only_json:
        args.sessions, args.steps_per_request, args.engine = [1024], [16], True
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory(args.malloc_keep_mb)
    device = torch.device(args.device)
    model = bench_model(device)
    per_session = state_size_bytes(model.net)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"# engine bench: {name}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), 28-128-128-10 sliding PSN k=8 float32, "
          f"state {per_session} B/session, freed memory kept: {f'{args.malloc_keep_mb} MB' if kept else 'no'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    cuda_cols = " device step ms | CUDA graph ms | state-byte floor ms | graph / floor |"
    print("| sessions | batched ms/step | session-steps/s | one-by-one ms | one-by-one steps/s | speed-up |"
          + (cuda_cols if device.type == "cuda" else ""))
    print("| --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- | --- |" if device.type == "cuda" else ""))
    for n in ([] if only_json else args.sessions):
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
        print("\n| sessions | steps/request | engine core us/session-step | backend alone us/session-step | ratio "
              "| engine core us/request |")
        print("| --- | --- | --- | --- | --- | --- |")
        results = []
        for n in args.sessions:
            for L in args.steps_per_request:
                r = engine_core_rate(model, n, L, args.max_batch_size, args.rounds)
                results.append(r)
                print(f"| {n} | {L} | {r['us_per_session_step']:.2f} | {r['backend_us_per_session_step']:.2f} | "
                      f"{r['ratio']:.2f}x | {r['us_per_request']:.1f} |", flush=True)
        if args.json is not None:
            out = results[-1] if len(results) == 1 else {"runs": results}
            args.json.write_text(json.dumps({**out, "machine": name, "cores": os.cpu_count(),
                                             "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
