"""How long the engine core takes to rebuild its sessions from the session log after a restart.

    python bench/recovery.py                               # 10,000 sessions of exported/mnist1d-sliding
    python bench/recovery.py --sessions 100000 --device cuda --json out.json

Builds an ``EngineCore`` in this process with a session log in a temporary folder (or
``--state-url redis://...``), opens ``--sessions`` sessions and streams ``--steps`` steps into each
through the engine's own request path (batched as the service does), then builds a second
``EngineCore`` on the same store and times ``recover()``: reading the log, replaying each session's
last n(k-1) inputs (batched), restoring score sums and retry windows, and the compaction that
follows. Then it checks one step of every session against the first engine (the same spikes,
bit for bit) and prints the figures; ``--json PATH`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.config import Settings  # noqa: E402
from service.core.proc import build_core  # noqa: E402
from service.ipc import OK  # noqa: E402


def drive(core, sids: list[str], L: int, seed: int, row: int, dtype: np.dtype) -> dict[str, bytes]:
    """One request of ``L`` steps per session through ``handle``/``step``; packed spikes per session."""
    rng = np.random.default_rng(seed)
    front = b"bench"
    for i, sid in enumerate(sids):
        payload = (rng.standard_normal(L * row) * 1.5).astype(dtype).tobytes()
        core.handle(front, [i, "steps", sid, -1, L, payload])
    while core.has_work():
        core.step()
    core.flush_log()
    out = {}
    for rid, status, result in core.take_outbox().get(front, []):
        assert status == OK, result
        out[sids[rid]] = result[3]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=64, help="steps streamed into each session before the restart")
    ap.add_argument("--chunk", type=int, default=8, help="steps per request")
    ap.add_argument("--model", default="mnist1d-sliding")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "exported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--state-url", default=None, help="redis://... instead of a temporary folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        (models / args.model).symlink_to((args.model_dir / args.model).resolve())
        settings = Settings(model_dir=models, device=args.device, dtype=args.dtype, max_sessions=args.sessions,
                            max_batch_size=1024, max_wait_ms=0, state_dir=None if args.state_url else Path(tmp) / "s",
                            state_url=args.state_url, state_compact_bytes=1 << 40, warmup=False,
                            session_queue=4, queue_depth=args.sessions * 2, torch_threads=1)
        t0 = time.perf_counter()
        core = build_core(settings)
        r = core.runners[args.model]
        row, wire = r.input_size, r.wire
        sids = [core.open(b"bench", i, args.model)["session_id"] for i in range(args.sessions)]
        for k in range(args.steps // args.chunk):
            drive(core, sids, args.chunk, k, row, wire)
            print(f"  streamed {(k + 1) * args.chunk} steps into {args.sessions:,} sessions "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        store = core.log.store
        log_bytes = len(store.load())
        store.close()
        # the restart: a second engine core on the same store, built as the service builds it
        t1 = time.perf_counter()
        core2 = build_core(settings)
        stats = core2.recovery
        recover_s = stats["seconds"]
        print(f"  second engine core up in {time.perf_counter() - t1:.2f} s, of which recover() {recover_s:.2f} s",
              file=sys.stderr)
        # the same next step on both engines: bit-identical spikes
        a = drive(core, sids, 1, 999, row, wire)
        b = drive(core2, sids, 1, 999, row, wire)
        same = sum(a[s] == b[s] for s in sids)
    result = {"sessions": args.sessions, "steps_before": args.steps, "model": args.model, "device": args.device,
              "dtype": args.dtype, "log_bytes": log_bytes, "recover_s": round(recover_s, 3),
              **{k: stats[k] for k in ("read_s", "replay_s", "compact_s")},
              "recovered": stats["sessions"], "lost": stats["lost"], "next_step_identical": same,
              "cores": os.cpu_count(), "store": "redis" if args.state_url else "file"}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if same != args.sessions or stats["lost"]:
        sys.exit(f"FAIL: {args.sessions - same} sessions answered differently after recovery, {stats['lost']} lost")


if __name__ == "__main__":
    main()
