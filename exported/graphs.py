"""Export-friendly views of a ``PSNNet``: the parallel form and the step form as plain tensor graphs.

They hold the (batch-norm folded, eval) network and call the same pure functions as ``PSNNet``
(``model.functional``), minus the Python-side input checks, so the ONNX tracer sees only tensor ops:

- ``ParallelGraph``: ``x`` (T, B, *input_shape) -> ``spikes`` (T, B, *out), ``scores`` (T, B, C).
  It traces the network's own ``PSNNet.parallel`` (the code ``forward`` runs after its checks), with
  the LIF loop swapped for its TorchScript version. T is read from the input (the sliding Toeplitz
  matrix is built from it by a gather on a lag index), so sliding models keep a dynamic T; masked /
  PSN models use their fixed (T, T) weight.
- ``StepGraph``: ``x`` (B, *input_shape) and the flat state -> ``spikes``, ``scores``, new state.
  It calls the neurons' pure step functions directly: the neuron modules' ``step`` checks a masked
  PSN's horizon in Python, which a trace would freeze.

The flat state order is ``state_spec(net)``: per spiking layer ``state_<i>_window`` (and
``state_<i>_t`` for masked layers), then ``state_score_sum`` and ``state_t``. Each output is the
input's name with a ``new_`` prefix.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model import functional as F
from model.functional import NeuronState
from model.network import NetState, PSNNet, normalise
from model.neurons import LIF, PSN, MaskedPSN, SlidingPSN


@dataclass(frozen=True)
class StateSpec:
    name: str  # ONNX input name; the output is "new_" + name
    shape: tuple[int, ...]  # without the leading batch axis
    dtype: str  # "float32" or "int64"


def state_spec(net: PSNNet) -> list[StateSpec]:
    """The step graph's state inputs, in order."""
    specs = []
    for i, layer in enumerate(net.layers):
        specs.append(StateSpec(f"state_{i}_window", (layer.neuron.k, *layer.out_shape), "float32"))
        if isinstance(layer.neuron, MaskedPSN):
            specs.append(StateSpec(f"state_{i}_t", (), "int64"))
    specs.append(StateSpec("state_score_sum", (net.cfg.num_classes,), "float32"))
    specs.append(StateSpec("state_t", (), "int64"))
    return specs


def flatten_state(net: PSNNet, state: NetState) -> list[Tensor]:
    """A ``NetState`` as the step graph's flat state inputs (``state_spec`` order)."""
    flat: list[Tensor] = []
    for layer, ns in zip(net.layers, state.neurons, strict=True):
        flat.append(ns.window)
        if isinstance(layer.neuron, MaskedPSN):
            flat.append(ns.t)
    return flat + [state.score_sum, state.t]


def unflatten_state(net: PSNNet, flat: list[Tensor]) -> NetState:
    """Inverse of ``flatten_state``; layers without their own t take the network's."""
    t = flat[-1]
    it = iter(flat[:-2])
    neurons = []
    for layer in net.layers:
        window = next(it)
        nt = next(it) if isinstance(layer.neuron, MaskedPSN) else t
        neurons.append(NeuronState(window=window, t=nt))
    return NetState(neurons=tuple(neurons), score_sum=flat[-2], t=t)


class ParallelGraph(nn.Module):
    """The parallel form of ``net`` with inputs normalised inside the graph."""

    def __init__(self, net: PSNNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net.parallel(x, neuron_forward=_neuron_parallel)  # the network's own code, traced
        return out.spikes, out.scores


class StepGraph(nn.Module):
    """One step of ``net`` over an explicit flat state (see ``state_spec``)."""

    def __init__(self, net: PSNNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        state = unflatten_state(self.net, list(flat))
        h = normalise(self.net.cfg, x)
        neurons = []
        for layer, ns in zip(self.net.layers, state.neurons, strict=True):
            cur = layer.current(h)  # (B, *out)
            h, ns = _neuron_step(layer.neuron, cur, ns)
            neurons.append(ns)
        scores, score_sum, t = F.running_mean_step(self.net.readout(h.flatten(1)), state.score_sum, state.t)
        new = NetState(neurons=tuple(neurons), score_sum=score_sum, t=t)
        return (h, scores, *flatten_state(self.net, new))


def _neuron_parallel(neuron: nn.Module, cur: Tensor) -> Tensor:
    T = cur.shape[0]
    if isinstance(neuron, SlidingPSN):
        weight = F.sliding_matrix(neuron.weight, T)  # (T, T) from a lag-index gather
        return F.matrix_forward(cur, weight, neuron.bias, neuron.alpha)[0]
    if isinstance(neuron, (MaskedPSN, PSN)):
        return F.matrix_forward(cur, neuron.effective_weight(T), neuron.bias[:T], neuron.alpha)[0]
    if isinstance(neuron, LIF):
        return _scripted_lif_scan()(cur, neuron.tau, neuron.v_threshold)[0]
    raise TypeError(f"no parallel export for {type(neuron).__name__}")


def _neuron_step(neuron: nn.Module, cur: Tensor, ns: NeuronState) -> tuple[Tensor, NeuronState]:
    if isinstance(neuron, SlidingPSN):
        s, _, new = F.sliding_step(cur, ns, neuron.weight, neuron.bias, neuron.alpha)
    elif isinstance(neuron, MaskedPSN):
        s, _, new = F.masked_step(cur, ns, neuron.weight, neuron.bias, neuron.k, neuron.alpha)
    elif isinstance(neuron, LIF):
        s, v = F.lif_step(cur, ns.window[:, 0], neuron.tau, neuron.v_threshold, neuron.alpha)
        new = NeuronState(window=v.unsqueeze(1), t=ns.t + 1)
    else:
        raise TypeError(f"{type(neuron).__name__} has no step form")
    return s, new


@functools.cache
def _scripted_lif_scan():
    """``model.functional.lif_scan`` compiled by TorchScript (its deprecation warning silenced: the exporter
    needs it), so the ONNX graph keeps a Loop over T."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(F.lif_scan)
