"""What the session log costs the engine core: CPU time per session-step with the log off and on.

    python bench/log_cost.py                  # 256 sessions, 1 and 16 steps per request, 5 alternating rounds
    python bench/log_cost.py --json out.json

``EngineCore`` in this process, as the engine-core process runs it minus the socket (requests
through ``handle``, ``step`` until all are answered, ``flush_log`` as the loop does before sending),
on the 28-128-128-10 sliding PSN of bench/service.py (k=8), float32, 1 torch thread. Reports process
CPU time (``time.process_time``, steadier than wall time on a shared machine) per session-step,
log off / on (``PSN_STATE_DIR`` in a temporary folder; ``--fsync``: also with ``PSN_STATE_FSYNC``),
rounds alternating, medians. The engine core is the service's bottleneck for binary frames, so
its ratio bounds the service's: ``python bench/service.py --logging`` measures the whole service.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.recovery import drive  # noqa: E402
from bench.service import make_model  # noqa: E402
from service.config import Settings  # noqa: E402
from service.core.proc import build_core  # noqa: E402

NAME = "bench-28-128-128-10-sliding-k8"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--session-steps", type=int, default=200_000, help="per measurement")
    ap.add_argument("--fsync", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        models = make_model(Path(tmp) / "m")
        modes = {"off": {}, "on": {"state_dir": Path(tmp) / "s1"}}
        if args.fsync:
            modes["fsync"] = {"state_dir": Path(tmp) / "s2", "state_fsync": True}
        cores = {}
        for mode, extra in modes.items():
            core = build_core(Settings(model_dir=models, max_sessions=args.sessions, max_batch_size=args.sessions,
                                       max_wait_ms=0, torch_threads=1, **extra))
            sids = [core.open(b"x", i, NAME)["session_id"] for i in range(args.sessions)]
            cores[mode] = (core, sids)
        r = cores["off"][0].runners[NAME]
        res: dict[tuple[str, int], list[float]] = {}
        for rnd in range(args.rounds):
            for L in args.steps:
                n = max(1, args.session_steps // (args.sessions * L))
                for mode, (core, sids) in cores.items():
                    drive(core, sids, L, 0, r.input_size, r.wire)
                    c0 = time.process_time()
                    for k in range(n):
                        drive(core, sids, L, k, r.input_size, r.wire)
                    us = (time.process_time() - c0) / (n * args.sessions * L) * 1e6
                    res.setdefault((mode, L), []).append(us)
            print(f"  round {rnd + 1}: " + ", ".join(f"{m} L={L} {v[-1]:.2f}" for (m, L), v in res.items()),
                  file=sys.stderr, flush=True)
        out = {"sessions": args.sessions, "cores": os.cpu_count(), "load_average": os.getloadavg()[0], "runs": {}}
        print("| steps/request | log off us/session-step (CPU) | log on | off/on (throughput ratio) |"
              + (" fsync | off/fsync |" if args.fsync else ""))
        print("| --- | --- | --- | --- |" + (" --- | --- |" if args.fsync else ""))
        for L in args.steps:
            off, on = statistics.median(res[("off", L)]), statistics.median(res[("on", L)])
            line = f"| {L} | {off:.2f} | {on:.2f} | {off / on:.2f}x |"
            run = {"off_us": off, "on_us": on, "ratio": off / on}
            if args.fsync:
                fs = statistics.median(res[("fsync", L)])
                line += f" {fs:.2f} | {off / fs:.2f}x |"
                run.update(fsync_us=fs, fsync_ratio=off / fs)
            print(line)
            out["runs"][str(L)] = run
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
