"""Offline training of a PSN-family network on real data, written out as a model folder.

    python -m model.train --dataset mnist1d --neuron sliding -k 8 --preset mnist1d --epochs 60 \
        --out exported/mnist1d-sliding
    psn train --data my_sensors.npz --neuron sliding -k 4 --layers L128,L128 --out exported/my-model

``--data`` reads your own sequences (.npz, CSV, UEA/UCR .ts, ``sktime:<Name>``; see ``model.datafile``),
checked before training starts; variable-length sequences are scored after their own last step.

Adam or SGD with a cosine learning-rate schedule, a progress bar (loss, accuracy, ETA), deterministic
for a seed. A masked PSN follows the mask relaxation schedule (``lam`` 0 -> 1 over the first 1/8 of
training) and is saved with ``lam = 1``. After training the folder's ``metrics.json`` holds the
measured test accuracy of the parallel form and of step-by-step streaming (see ``model.evaluate``).
Every option is checked before any data is loaded or any step is taken (a ``--data`` file is read and
checked as part of the options). Ctrl-C stops a run without writing anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.data import (
    DATASETS,
    Dataset,
    final_scores,
    load_dataset,
    time_major,
    with_channel_axis,
)
from model.datafile import source_of
from model.evaluate import evaluate
from model.kinds import kind
from model.network import NetConfig, PSNNet
from model.neurons import MaskedPSN, mask_schedule
from model.options import PRESETS, build_parser, parse_args, parse_layers, resolve_device  # noqa: F401 (re-exported)


@dataclass
class TrainResult:
    net: PSNNet  # trained, eval mode, lam = 1 (batch norm not folded)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    train_seconds: float = 0.0


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def net_config(a: argparse.Namespace, data: Dataset) -> NetConfig:
    mean, std = data.input_stats(per_feature=bool(data.source) and data.source not in DATASETS)
    return NetConfig(input_shape=data.input_shape, num_classes=data.num_classes, layers=a.layers,
                     neuron=a.neuron, k=a.k, T=data.T if kind(a.neuron).horizon else None,
                     alpha=a.alpha, input_mean=mean, input_std=std)


@torch.no_grad()
def init_masked_exponential(net: PSNNet) -> None:
    """Start every masked PSN from the sliding PSN's exponential kernel (``W[t, i] = 2^(i-t)`` in the band).

    With the default uniform init a masked layer fires rarely and trains poorly; this init starts it
    where a sliding PSN starts, with per-step weights free to move away from it.
    """
    for layer in net.layers:
        if isinstance(layer.neuron, MaskedPSN):
            n = layer.neuron
            t = torch.arange(n.T, dtype=n.weight.dtype, device=n.weight.device)
            lag = t.unsqueeze(1) - t.unsqueeze(0)  # (T, T) t - i
            n.weight.copy_(torch.where((lag >= 0) & (lag < n.k), torch.pow(2.0, -lag), torch.zeros_like(lag)))


def train(net: PSNNet, data: Dataset, a: argparse.Namespace) -> TrainResult:
    """Train ``net`` in place on ``data`` with the options ``a``; returns it in eval mode with lam = 1."""
    dev = a.device
    net.to(dev)
    x_tr, y_tr = data.x_train.to(dev), data.y_train.to(dev)
    len_tr = data.lengths_train.to(dev) if data.lengths_train is not None else None
    params = net.parameters()
    if a.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=a.lr, weight_decay=a.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=a.weight_decay)
    steps_per_epoch = math.ceil(x_tr.shape[0] / a.batch_size)
    total = a.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator().manual_seed(a.seed)  # the data order depends on the seed alone
    loss_fn = nn.CrossEntropyLoss()
    result = TrainResult(net=net)
    start, step = time.perf_counter(), 0
    bar = tqdm(range(a.epochs), desc=f"{data.name}-{a.neuron}", unit="epoch", disable=a.quiet, file=sys.stderr)
    for epoch in bar:
        net.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for xb, yb, lb in _device_batches(x_tr, y_tr, len_tr, a.batch_size, gen):
            xb, lb = augment(xb, a.shift, a.noise, gen, lb)
            net.set_lam(mask_schedule(step / total))
            # (B, C) mean readout over each sequence's valid steps (causal: padding after them changes nothing)
            scores = final_scores(net(xb, lb).scores, lb)
            loss = loss_fn(scores, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.item() * yb.shape[0]
            correct += int((scores.argmax(1) == yb).sum())
            seen += yb.shape[0]
        test_acc = _quick_test_acc(net, data, dev)
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen, "test_acc": test_acc,
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        result.history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.3f}", test=f"{test_acc:.3f}")
    bar.close()
    result.train_seconds = time.perf_counter() - start
    net.set_lam(1.0)
    net.eval()
    return result


def _device_batches(x: Tensor, y: Tensor, lengths: Tensor | None, batch_size: int, gen: torch.Generator):
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    for i in range(0, x.shape[0], batch_size):
        idx = order[i:i + batch_size]
        yield time_major(x[idx]), y[idx], None if lengths is None else lengths[idx]


def augment(x: Tensor, shift: int, noise: float, gen: torch.Generator,
            lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Shift each sample of ``x`` (T, B, *F) in time by a random -shift..shift steps (zero fill), add noise.

    With ``lengths`` (B,) a shifted sequence ends ``s`` steps later (earlier), within 1..T; returns the new lengths.
    """
    if shift > 0:
        T, B = x.shape[:2]
        s = torch.randint(-shift, shift + 1, (B,), generator=gen).to(x.device)
        src = torch.arange(T, device=x.device).unsqueeze(1) - s.unsqueeze(0)  # (T, B) source step
        valid = ((src >= 0) & (src < T)).view(T, B, *([1] * (x.dim() - 2)))
        idx = src.clamp(0, T - 1).view(T, B, *([1] * (x.dim() - 2))).expand_as(x)
        x = torch.where(valid, x.gather(0, idx), torch.zeros((), device=x.device, dtype=x.dtype))
        if lengths is not None:
            lengths = (lengths + s).clamp(1, T)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return x, lengths


@torch.no_grad()
def _quick_test_acc(net: PSNNet, data: Dataset, dev: torch.device) -> float:
    """Parallel-form test accuracy in eval mode at the current lam (for the progress bar and curve)."""
    net.eval()
    correct = 0
    for i in range(0, data.x_test.shape[0], 1000):
        scores = net(time_major(data.x_test[i:i + 1000]).to(dev)).scores.cpu()
        lengths = None if data.lengths_test is None else data.lengths_test[i:i + 1000]
        correct += int((final_scores(scores, lengths).argmax(1) == data.y_test[i:i + 1000]).sum())
    net.train()
    return correct / data.x_test.shape[0]


def limit(data: Dataset, train_n: int | None, test_n: int | None) -> Dataset:
    def cut(t: Tensor | None, n: int | None) -> Tensor | None:
        return None if t is None else t[:n]

    return dataclasses.replace(data, x_train=data.x_train[:train_n], y_train=data.y_train[:train_n],
                               x_test=data.x_test[:test_n], y_test=data.y_test[:test_n],
                               lengths_train=cut(data.lengths_train, train_n),
                               lengths_test=cut(data.lengths_test, test_n))


def run(a: argparse.Namespace) -> Path:
    """Load data, train, measure, write the model folder; returns its path."""
    from model.report import write_folder  # matplotlib is only needed once training is done

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = limit(a.loaded if a.loaded is not None else load_dataset(a.dataset), a.train_limit, a.test_limit)
    if a.layers[0].kind == "conv" and len(data.input_shape) == 1:
        data = with_channel_axis(data)  # a step of F features becomes (1 channel, F) for the conv
    net = PSNNet(net_config(a, data))
    init_masked_exponential(net)
    print(f"{data.description}\n{a.neuron} k={a.k} preset={a.preset}: {net.num_parameters()} parameters, "
          f"device {a.device}", file=sys.stderr)
    result = train(net, data, a)
    fused = result.net.fused().cpu()  # what the service loads
    t0 = time.perf_counter()
    ev = evaluate(fused, data.x_test, data.y_test, lengths=data.lengths_test)
    metrics: dict[str, Any] = {
        "dataset": data.name, "data": data.source, "neuron": a.neuron, "k": a.k, "preset": a.preset, "T": data.T,
        "variable_length": data.variable_length,
        "test_data": None if a.test_data is None else source_of(a.test_data),
        "test_fraction": a.test_fraction if a.data is not None else None,
        "test_acc_parallel": round(ev.acc_parallel, 5),
        "test_acc_streaming": None if ev.acc_streaming is None else round(ev.acc_streaming, 5),
        "streaming_agreement": ev.agreement, "streaming_max_score_diff": ev.max_score_diff,
        "acc_per_step": ev.acc_per_step, "test_samples": int(data.x_test.shape[0]),
        "train_samples": int(data.x_train.shape[0]), "params": result.net.num_parameters(),
        "train_seconds": round(result.train_seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_name(a.device), "device": str(a.device), "epochs": a.epochs,
        "batch_size": a.batch_size, "optimizer": a.optimizer, "lr": a.lr, "weight_decay": a.weight_decay,
        "augment": {"shift": a.shift, "noise": a.noise},
        "schedule": "cosine", "seed": a.seed, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": a.command,
        "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in result.history],
    }
    try:
        path = write_folder(Path(a.out), result.net, fused, data, metrics, compare=a.compare)
    except OSError as e:  # a full disk, a quota: after the training, not a traceback (the folder is as it was)
        print(f"psn train: cannot write the model folder {a.out}: {e.strerror or e}"
              f"{f' ({e.filename})' if e.filename else ''}; nothing was written ({a.out} is as it was)",
              file=sys.stderr)
        raise SystemExit(1) from None
    stream = "n/a" if ev.acc_streaming is None else f"{ev.acc_streaming:.4f}"
    print(f"wrote {path}: test acc parallel {ev.acc_parallel:.4f}, streaming {stream}, "
          f"{result.train_seconds:.0f} s training", file=sys.stderr)
    return path


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised by ``main``'s own SIGINT handler instead of Python's. CPython remembers
    an exception of exactly ``KeyboardInterrupt`` that passes through code run by ``PyRun_String`` (as
    native extensions do) and, at exit, kills the process with SIGINT even though ``main`` handled it: the
    message was printed but the exit status was -2, not 130 (2 of 30 tries with Ctrl-C at random times).
    A subclass is caught by every ``except KeyboardInterrupt`` and is not remembered that way."""


def _interrupted(signum: int, frame: Any) -> None:
    raise Interrupted


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    a.command = "psn train " + " ".join(sys.argv[1:] if argv is None else argv)
    # only where Python's own handler is in place (an ignored SIGINT stays ignored) and can be replaced
    ours = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, _interrupted)
    try:
        run(a)
    except KeyboardInterrupt:
        # The folder is only ever written at the very end, atomically (model.folder.save_model_folder).
        print(f"\ninterrupted: nothing was written ({a.out} is as it was)", file=sys.stderr)
        return 130
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
