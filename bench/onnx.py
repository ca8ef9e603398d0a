"""onnxruntime against PyTorch on the CPU: the parallel form (batch 1 and 256) and one streaming step.

    python bench/onnx.py                       # every model under exported/ (a synthetic net if none)
    python bench/onnx.py exported/smnist-sliding --batch 1 256 --sessions 256 --json out.json

Both run float32 on the same number of intra-op threads (``--threads``, default PyTorch's). The load
average is printed: on a shared CPU, multi-threaded PyTorch slows down badly when other processes run.
A model folder without ONNX files is exported to a temporary folder first. With no model folders, a
28-128-128-10 sliding PSN net (k=8, untrained) stands in. Times are medians over ``--repeat`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# This file's name would shadow the onnx package: drop bench/ from the path, add the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from exported.onnx_export import PARALLEL_FILE, STEP_FILE, export_model  # noqa: E402
from exported.parity import random_inputs  # noqa: E402
from exported.runtime import OnnxModel  # noqa: E402
from model.folder import LoadedModel, find_model_folders, load_model_folder, save_model_folder  # noqa: E402
from model.network import LayerConfig, NetConfig, PSNNet  # noqa: E402


def timer(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_folder(root: Path) -> Path:
    cfg = NetConfig(input_shape=(28,), num_classes=10, layers=(LayerConfig(out=128), LayerConfig(out=128)),
                    neuron="sliding", k=8)
    return save_model_folder(root / "synthetic-28-128-128-10-sliding-k8", PSNNet(cfg).eval(), dataset="")


def onnx_dir(model: LoadedModel, tmp: Path) -> Path:
    want = [PARALLEL_FILE] + ([STEP_FILE] if model.cfg.streams else [])
    if all((model.path / f).is_file() for f in want):
        return model.path
    export_model(model, tmp / model.name)
    return tmp / model.name


def steps_of(model: LoadedModel, default: int) -> int:
    if model.cfg.T is not None:
        return model.cfg.T
    parity = model.path / "onnx_parity.json"
    if parity.is_file():
        return int(json.loads(parity.read_text())["parity"]["random"]["T"])
    return default


@torch.no_grad()
def bench_model(model: LoadedModel, onnx_model: OnnxModel, T: int, batches: list[int], sessions: int,
                repeat: int) -> list[dict]:
    net = model.net
    rows = []
    for B in batches:
        x = random_inputs(model, T, B, seed=B)
        xt = torch.from_numpy(x)
        t_torch = timer(lambda xt=xt: net(xt), repeat)
        t_onnx = timer(lambda x=x: onnx_model.parallel(x), repeat)
        rows.append({"model": model.name, "form": f"parallel T={T}", "batch": B,
                     "torch_ms": t_torch * 1e3, "onnx_ms": t_onnx * 1e3})
    if onnx_model.streams:
        x = random_inputs(model, 1, sessions, seed=1)[0]
        xt = torch.from_numpy(x)
        state_t = net.initial_state(sessions)
        state_o = onnx_model.initial_state(sessions)

        def torch_step() -> None:
            nonlocal state_t
            _, state_t = net.step(xt, state_t)
            if model.cfg.neuron == "masked" and int(state_t.t[0]) >= model.cfg.T:  # stay inside the horizon
                state_t = net.initial_state(sessions)

        def onnx_step() -> None:
            nonlocal state_o
            _, _, state_o = onnx_model.step(x, state_o)
            if model.cfg.neuron == "masked" and int(state_o[-1][0]) >= model.cfg.T:
                state_o = onnx_model.initial_state(sessions)

        rows.append({"model": model.name, "form": "one streaming step", "batch": sessions,
                     "torch_ms": timer(torch_step, repeat) * 1e3, "onnx_ms": timer(onnx_step, repeat) * 1e3})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, help="model folders (default: all under exported/)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--T", type=int, default=None, help="steps for sliding/LIF models (default: their data's)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for both (default: PyTorch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rows: list[dict] = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folders = args.folders or find_model_folders(Path(__file__).resolve().parents[1] / "exported")
        if not folders:
            folders = [synthetic_folder(tmp)]
        for folder in folders:
            model = load_model_folder(folder)
            onnx_model = OnnxModel(onnx_dir(model, tmp), threads=threads)
            T = args.T if args.T and model.cfg.T is None else steps_of(model, 28)
            rows += bench_model(model, onnx_model, T, args.batch, args.sessions, args.repeat)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({threads} threads), onnxruntime {__import__('onnxruntime').__version__}, "
          f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print("| model | form | batch | PyTorch ms | onnxruntime ms | onnxruntime speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['form']} | {r['batch']} | {r['torch_ms']:.3f} | {r['onnx_ms']:.3f} | "
              f"{r['torch_ms'] / r['onnx_ms']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
