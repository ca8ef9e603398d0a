"""Parity of a model's ONNX files with its PyTorch network (onnxruntime on the CPU).

What must hold (``ParityReport.passed``):
- scores within ``SCORE_ATOL`` (float32 rounding) on every sample whose spikes all agree;
- spikes identical away from exact ties: a sample may disagree only if PyTorch saw a membrane
  ``|H| < TIE_EPS`` somewhere in it (a threshold crossing that rounding can flip), and at most
  ``MAX_TIE_FRACTION`` of the samples may;
- on real test samples, the same accuracy (up to the samples explained by ties);
- the step file run step by step equals the parallel file, by the same rules;
- sliding / LIF models: the same at several T (dynamic T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from exported.onnx_export import dynamic_T, example_T
from exported.runtime import OnnxModel
from model import functional as F
from model.folder import LoadedModel
from model.network import PSNNet, normalise
from model.neurons import LIF

SCORE_ATOL = 1e-4
TIE_EPS = 1e-5
MAX_TIE_FRACTION = 0.01


@dataclass
class Samples:
    """Real test samples: ``x`` (T, B, *input_shape) float32, labels ``y`` (B,); variable-length data has
    ``lengths`` (B,) (padding past them; accuracy is read at each sample's own last step)."""

    x: np.ndarray
    y: np.ndarray
    source: str
    lengths: np.ndarray | None = None


def compare(ref_spikes: np.ndarray, ref_scores: np.ndarray, spikes: np.ndarray, scores: np.ndarray,
            near_tie: np.ndarray) -> dict:
    """One comparison over (T, B, ...) outputs; ``near_tie`` (B,) marks samples with a membrane tie."""
    T, B = ref_scores.shape[:2]
    flips = (spikes != ref_spikes).reshape(T, B, -1).sum(axis=(0, 2))  # (B,)
    differs = flips > 0
    score_diff = np.abs(scores - ref_scores).reshape(T, B, -1).max(axis=(0, 2))  # (B,)
    clean_diff = float(score_diff[~differs].max()) if (~differs).any() else 0.0
    unexplained = int((differs & ~near_tie).sum())
    ok = clean_diff <= SCORE_ATOL and unexplained == 0 and differs.mean() <= MAX_TIE_FRACTION
    return {
        "T": int(T), "batch": int(B),
        "scores_max_abs_diff": clean_diff,
        "scores_max_abs_diff_all": float(score_diff.max()),
        "spike_mismatches": int(flips.sum()), "spikes_compared": int(ref_spikes.size),
        "samples_with_spike_mismatch": int(differs.sum()), "unexplained_by_ties": unexplained,
        "ok": bool(ok),
    }


@torch.no_grad()
def min_abs_membrane(net: PSNNet, x: Tensor) -> np.ndarray:
    """Smallest ``|H|`` any spiking layer sees per sample of ``x`` (T, B, *input_shape): (B,)."""
    T, B = x.shape[:2]
    h = normalise(net.cfg, x)
    smallest = torch.full((B,), float("inf"))
    for layer in net.layers:
        cur = layer.current(h.reshape(T * B, *h.shape[2:]))
        cur = cur.reshape(T, B, *cur.shape[1:])
        if isinstance(layer.neuron, LIF):
            h, mem = _lif_membrane(cur, layer.neuron)
        else:
            mem = layer.neuron.membrane(cur)
            h = (mem >= 0).to(cur.dtype)
        smallest = torch.minimum(smallest, mem.abs().transpose(0, 1).reshape(B, -1).amin(1))
    return smallest.numpy()


def _lif_membrane(cur: Tensor, neuron: LIF) -> tuple[Tensor, Tensor]:
    return F.lif_scan(cur, neuron.tau, neuron.v_threshold)


@torch.no_grad()
def _torch_run(net: PSNNet, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xt = torch.from_numpy(x)
    out = net(xt)
    return out.spikes.numpy(), out.scores.numpy(), min_abs_membrane(net, xt) < TIE_EPS


def random_inputs(model: LoadedModel, T: int, batch: int, seed: int) -> np.ndarray:
    """Inputs on the scale the network was trained for: ``input_mean + input_std * N(0, 1)``."""
    g = np.random.default_rng(seed)
    cfg = model.cfg
    x = g.standard_normal((T, batch, *cfg.input_shape)).astype(np.float32)
    return (np.asarray(cfg.input_mean) + np.asarray(cfg.input_std) * x).astype(np.float32)


def check_parity(model: LoadedModel, onnx_model: OnnxModel, samples: Samples | None = None, *,
                 batch: int = 16, seed: int = 0) -> dict:
    """Every parity check for one exported model; the summary dict has ``passed``."""
    net = model.net
    T0 = samples.x.shape[0] if samples is not None else example_T(model)
    report: dict = {"model": model.name, "neuron": model.cfg.neuron, "atol": SCORE_ATOL, "tie_eps": TIE_EPS,
                    "max_tie_fraction": MAX_TIE_FRACTION}

    x = random_inputs(model, T0, batch, seed)
    ref_s, ref_sc, tie = _torch_run(net, x)
    par_s, par_sc = onnx_model.parallel(x)
    report["random"] = compare(ref_s, ref_sc, par_s, par_sc, tie)
    if onnx_model.streams:
        st_s, st_sc, _ = onnx_model.run_steps(x)
        report["step_vs_parallel"] = compare(par_s, par_sc, st_s, st_sc, tie)
    if dynamic_T(model):
        report["dynamic_T"] = []
        for i, T in enumerate(sorted({1, 3, T0 + 5, 2 * T0 + 1})):
            xd = random_inputs(model, T, 3, seed + 1 + i)
            ref_s, ref_sc, tie = _torch_run(net, xd)
            report["dynamic_T"].append(compare(ref_s, ref_sc, *onnx_model.parallel(xd), tie))
    if samples is not None:
        report["real"] = _real(net, onnx_model, samples)
    checks = [report["random"], report.get("step_vs_parallel"), *report.get("dynamic_T", []),
              *(report["real"]["checks"] if samples is not None else [])]
    report["passed"] = all(c["ok"] for c in checks if c is not None) and (
        samples is None or report["real"]["accuracy_ok"])
    return report


def _real(net: PSNNet, onnx_model: OnnxModel, samples: Samples) -> dict:
    ref_s, ref_sc, tie = _torch_run(net, samples.x)
    par_s, par_sc = onnx_model.parallel(samples.x)
    out: dict = {"source": samples.source, "samples": int(samples.y.shape[0]),
                 "checks": [compare(ref_s, ref_sc, par_s, par_sc, tie)]}
    acc = {"acc_torch": _acc(ref_sc, samples), "acc_onnx": _acc(par_sc, samples)}
    if onnx_model.streams:
        st_s, st_sc, _ = onnx_model.run_steps(samples.x)
        out["checks"].append(compare(par_s, par_sc, st_s, st_sc, tie))
        acc["acc_onnx_step"] = _acc(st_sc, samples)
    out.update(acc)
    slack = sum(c["samples_with_spike_mismatch"] for c in out["checks"]) / max(1, out["samples"])
    out["accuracy_ok"] = all(abs(a - acc["acc_torch"]) <= slack + 1e-12 for a in acc.values())
    return out


def _acc(scores: np.ndarray, samples: Samples) -> float:
    """Accuracy of running-mean ``scores`` (T, B, C), each sample read after its own last step."""
    B = scores.shape[1]
    last = samples.lengths - 1 if samples.lengths is not None else np.full(B, scores.shape[0] - 1)
    return float((scores[last, np.arange(B)].argmax(-1) == samples.y).mean())
