"""Forward and forward+backward time of the PSN family against a LIF loop, beside the byte floor.

    python bench/neurons.py                      # CPU, small sizes
    python bench/neurons.py --device cuda        # GPU: also the fused Triton forward (fp32 and tf32)
    python bench/neurons.py --device cuda --T 64 --N 1048576 --json out.json

The byte floor is the time to read the input once and write the spikes once at the copy bandwidth
measured here (``dst.copy_(src)``, bytes read + written over time).
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

from model import LIF, PSN, MaskedPSN, SlidingPSN  # noqa: E402
from model.kernels import PRECISIONS, fused_available, psn_forward_banded, psn_forward_fused  # noqa: E402

# Launch configurations tried at the --sweep point (T=max, N=max): (block_n, num_warps) for the dense
# kernel, (block_t, block_n, num_warps) for the banded one. The kernels' defaults are the first of each.
DENSE_CONFIGS = [(None, 4), (32, 4), (64, 8), (128, 8)]
BANDED_CONFIGS = [(8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (64, 128, 8)]


def timer(device: torch.device, fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeat: int) -> float:
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    sec = timer(device, lambda: dst.copy_(src), repeat)
    return 2 * nbytes / sec


def make(kind: str, T: int, k: int) -> torch.nn.Module:
    return {"lif": lambda: LIF(), "psn": lambda: PSN(T), "masked": lambda: MaskedPSN(k, T),
            "sliding": lambda: SlidingPSN(k)}[kind]()


def bench_neuron(neuron: torch.nn.Module, kind: str, x: torch.Tensor, device: torch.device, repeat: int,
                 backward: bool, sweep: bool = False) -> list[dict]:
    """Rows for one neuron on ``x`` (T, N): PyTorch forward (+ backward), and the fused kernel where it runs."""
    T, N = x.shape
    neuron.validate = False
    os.environ["PSN_FUSED"] = "0"  # the plain PyTorch path first; its spikes are the kernels' reference
    with torch.no_grad():
        fwd = timer(device, lambda: neuron(x), repeat)
        ref = neuron(x)
    os.environ.pop("PSN_FUSED")
    both = None
    if backward:
        xg = x.clone().requires_grad_(True)

        def fwd_bwd() -> None:
            neuron.zero_grad(set_to_none=True)
            xg.grad = None
            neuron(xg).sum().backward()

        both = timer(device, fwd_bwd, max(3, repeat // 2))
    rows = [dict(neuron=kind, T=T, N=N, fwd_ms=fwd * 1e3, fwd_bwd_ms=None if both is None else both * 1e3)]
    if kind == "lif" or not fused_available(x):
        return rows
    with torch.no_grad():
        w, b, band = neuron.effective_weight(T), neuron.bias, neuron.band_weight(T)

        def add(name: str, fn: Callable[[], torch.Tensor]) -> None:
            try:
                mismatch = (fn() != ref).float().mean().item()
            except Exception as e:  # e.g. a precision this Triton build cannot compile: report, go on
                print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                return
            rows.append(dict(neuron=name, T=T, N=N, fwd_ms=timer(device, fn, repeat) * 1e3, fwd_bwd_ms=None,
                             spike_mismatch=mismatch))

        for prec in PRECISIONS:
            for block_n, warps in DENSE_CONFIGS if sweep else DENSE_CONFIGS[:1]:
                tag = "" if block_n is None else f"-n{block_n}w{warps}"
                add(f"{kind}-dense-{'fp32' if prec == 'ieee' else prec}{tag}",
                    lambda p=prec, bn=block_n, nw=warps: psn_forward_fused(x, w, b, precision=p, block_n=bn,
                                                                           num_warps=nw))
        if band is not None:
            for bt, bn, warps in BANDED_CONFIGS if sweep else BANDED_CONFIGS[:1]:
                tag = "" if (bt, bn, warps) == BANDED_CONFIGS[0] else f"-t{bt}n{bn}w{warps}"
                add(f"{kind}-banded{tag}",
                    lambda bt=bt, bn=bn, nw=warps: psn_forward_banded(x, band, b, block_t=bt, block_n=bn,
                                                                      num_warps=nw))
        add(f"{kind}-module", lambda: neuron(x))  # what forward() picks (fused path on)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--T", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--N", type=int, nargs="+", default=None, help="neurons (default: 4096 65536 on CPU, "
                    "65536 1048576 on GPU)")
    ap.add_argument("-k", type=int, default=4, help="order of the masked and sliding PSN")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--sweep", action="store_true", help="try several kernel launch configurations at the "
                    "largest T and N")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    Ns = args.N or ([1 << 16, 1 << 20] if cuda else [1 << 12, 1 << 16])
    repeat = args.repeat or (20 if cuda else 5)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 products unless a row says tf32
    bw = copy_bandwidth(device, 1 << 30 if cuda else 1 << 27, repeat)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"# device {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s; k={args.k}; fp32")
    print(f"{'neuron':<16} {'T':>3} {'N':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'floor ms':>9} {'fwd/floor':>9}")
    rows = []
    for T in args.T:
        for N in Ns:
            x = torch.randn(T, N, device=device)
            floor = 2 * x.numel() * 4 / bw
            here = [row for kind in ("lif", "psn", "masked", "sliding")
                    for row in bench_neuron(make(kind, T, args.k).to(device), kind, x, device, repeat,
                                            not args.no_backward,
                                            args.sweep and T == max(args.T) and N == max(Ns))]
            for row in here:
                row["floor_ms"] = floor * 1e3
            for r in here:
                fb = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.3f}"
                extra = f"  mismatch {r['spike_mismatch']:.1e}" if "spike_mismatch" in r else ""
                print(f"{r['neuron']:<16} {T:>3} {N:>8} {r['fwd_ms']:>9.3f} {fb:>11} {r['floor_ms']:>9.3f} "
                      f"{r['fwd_ms'] / r['floor_ms']:>9.2f}{extra}", flush=True)
            rows += here
    if args.json:
        args.json.write_text(json.dumps({"device": name, "copy_GBps": bw / 1e9, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
