"""Engine-core turns of requests of mixed step counts (1-16): one backend call per distinct count, power-of-two
pieces, or one ragged call padded to the longest (``EngineCore.execute``), on a shipped model.

    python bench/mixed.py                       # mnist1d-sliding, 8 / 32 / 128 sessions, 200 turns each
    python bench/mixed.py --model smnist-sliding --sessions 16 64 --turns 100

Each turn every session sends one request of a random 1-16 steps; the engine core runs the turn (one
``step``), with freed memory kept as in the engine core. Reported per plan: the median turn's time (CPU,
1 thread, as the service) and the backend calls per turn. The plan is forced through
``ModelRunner.call_rows`` (0: never ragged; 1e9: ragged whenever it saves calls) and ``split_levels``
(monkeypatched to None: one call per distinct count);
"auto" is the service's choice, with ``call_rows`` measured as at warm-up (printed to stderr).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this folder has a service.py of its own

import service.core.engine as engine_mod  # noqa: E402
from model.folder import load_model_folder  # noqa: E402
from service.backends.torch_backend import TorchBackend  # noqa: E402
from service.config import Settings  # noqa: E402
from service.core.engine import EngineCore  # noqa: E402
from service.memory import keep_freed_memory  # noqa: E402


def run(model: str, sessions: int, turns: int, plan: str, seed: int = 0) -> tuple[float, float]:
    torch.set_num_threads(1)
    loaded = load_model_folder(ROOT / "exported" / model)
    settings = Settings(max_batch_size=max(sessions, 1), max_wait_ms=0, warmup=False, max_sessions=sessions)
    core = EngineCore([TorchBackend(loaded, sessions)], settings)
    runner = core.runners[model]
    if plan == "auto":  # what the service does: measured at warm-up
        runner.measure_call_rows()
        print(f"(measured call_rows: {runner.call_rows:.0f})", file=sys.stderr)
    else:
        runner.call_rows = 1e9 if plan == "ragged" else 0.0
    split = engine_mod.split_levels
    if plan == "per count":
        engine_mod.split_levels = lambda runs: None
    calls = 0
    for fn in ("run", "run_ragged"):
        orig = getattr(runner, fn)

        def counted(*a, _orig=orig):
            nonlocal calls
            calls += 1
            return _orig(*a)
        setattr(runner, fn, counted)
    try:
        for rid in range(sessions):
            core.handle(b"f", [rid, "open", model, False])
        sids = [body["session_id"] for _, _, body in core.take_outbox()[b"f"]]
        rng = np.random.default_rng(seed)
        row = runner.input_size
        times = []
        for turn in range(turns):
            for i, sid in enumerate(sids):
                L = int(rng.integers(1, 17))
                x = rng.normal(size=L * row).astype(runner.wire)
                core.handle(b"f", [10_000 + turn * sessions + i, "steps", sid, -1, L, x.tobytes()])
            t0 = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - t0)
            core.take_outbox()
        return statistics.median(times[turns // 10:]), calls / turns
    finally:
        engine_mod.split_levels = split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnist1d-sliding")
    p.add_argument("--sessions", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--turns", type=int, default=200)
    a = p.parse_args()
    keep_freed_memory(256)  # as the engine core does (PSN_MALLOC_KEEP_MB)
    print("| sessions | plan | median turn ms | calls per turn | us per session-step |")
    print("| --- | --- | --- | --- | --- |")
    for n in a.sessions:
        for plan in ("per count", "pieces", "ragged", "auto"):
            t, calls = run(a.model, n, a.turns, plan)
            print(f"| {n} | {plan} | {t * 1e3:.2f} | {calls:.1f} | {t * 1e6 / (n * 8.5):.1f} |", flush=True)


if __name__ == "__main__":
    main()
