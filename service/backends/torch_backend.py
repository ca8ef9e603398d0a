"""PyTorch backend: session state as preallocated tensors on the model's device, one row per slot."""

from __future__ import annotations

import torch
from torch import Tensor

from model.folder import LoadedModel
from model.functional import NeuronState
from model.network import NetState
from service.config import Settings


class TorchBackend:
    """Runs ``model.net`` (eval, batch norm folded) with its ``chunk`` form over gathered slot state.

    Every call runs in ``torch.inference_mode`` (no autograd bookkeeping at all: no version counters, no
    view tracking): a backend call of a few sessions took 13-15% less time than under ``no_grad``
    (bench net and mnist1d-sliding, 2-core CPU). The slot tables are made outside it, as ordinary tensors,
    so that they may be updated in place from any mode."""

    def __init__(self, model: LoadedModel, max_slots: int, settings: Settings | None = None):
        self.model = model
        weight = model.net.readout.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_slots = max_slots if model.cfg.streams else 0
        with torch.no_grad():
            # (max_slots, k, *features) per layer, (max_slots, C), (max_slots,)
            self._state: NetState | None = model.net.initial_state(self.max_slots) if self.max_slots else None
        # one step of a sliding-PSN net on the CPU: ``PSNNet.step_slots_exact_`` (bit for bit the chunk path)
        self._exact_step = self.max_slots > 0 and self.device.type == "cpu" and model.net.sliding_only

    def _slots(self) -> NetState:
        if self._state is None:
            raise RuntimeError(f"model {self.model.name!r} cannot stream: it has no session slots")
        return self._state

    def _gather(self, idx: Tensor) -> NetState:
        """The state of slots ``idx`` (on the device), as new tensors."""
        st = self._slots()
        return NetState(
            neurons=tuple(NeuronState(ns.window.index_select(0, idx), ns.t.index_select(0, idx)) for ns in st.neurons),
            score_sum=st.score_sum.index_select(0, idx), t=st.t.index_select(0, idx))

    def _scatter(self, idx: Tensor, new: NetState, sums: bool = True) -> None:
        """Write ``new`` back to slots ``idx`` (with the score sums unless ``sums`` is False)."""
        st = self._slots()
        for ns, nn_ in zip(st.neurons, new.neurons, strict=True):
            ns.window.index_copy_(0, idx, nn_.window)
            ns.t.index_copy_(0, idx, nn_.t)
        if sums:
            st.score_sum.index_copy_(0, idx, new.score_sum)
        st.t.index_copy_(0, idx, new.t)

    @torch.inference_mode()
    def reset(self, slots: Tensor) -> None:
        st = self._slots()
        idx = slots.to(self.device)
        for ns in st.neurons:
            ns.window.index_fill_(0, idx, 0)
            ns.t.index_fill_(0, idx, 0)
        st.score_sum.index_fill_(0, idx, 0)
        st.t.index_fill_(0, idx, 0)

    @torch.inference_mode()
    def seek(self, slots: Tensor, t: Tensor) -> None:
        """Zero windows and score sums, step counters set to ``t`` (B,): the start of a replay."""
        st = self._slots()
        idx, t = slots.to(self.device), t.to(self.device, torch.long)
        for ns in st.neurons:
            ns.window.index_fill_(0, idx, 0)
            ns.t.index_copy_(0, idx, t)
        st.score_sum.index_fill_(0, idx, 0)
        st.t.index_copy_(0, idx, t)

    @torch.inference_mode()
    def replay(self, x: Tensor, slots: Tensor) -> None:
        """``run`` without outputs, for recovery: ``PSNNet.replay`` (computes each layer only where the
        next one reads it) over the gathered rows, scattered back."""
        idx = slots.to(self.device)
        rows = self._gather(idx)
        new = self.model.net.replay(x.to(self.device, self.dtype), rows)
        self._scatter(idx, new, sums=False)  # score sums are the caller's

    @torch.inference_mode()
    def score_sums(self, slots: Tensor) -> Tensor:
        return self._slots().score_sum.index_select(0, slots.to(self.device)).cpu()

    @torch.inference_mode()
    def set_score_sums(self, slots: Tensor, sums: Tensor) -> None:
        st = self._slots()
        st.score_sum.index_copy_(0, slots.to(self.device), sums.to(self.device, st.score_sum.dtype))

    @torch.inference_mode()
    def run(self, x: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        return self._to_host(*self.step_device(x.to(self.device, self.dtype), slots.to(self.device)))

    def _to_host(self, spikes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        if self.device.type != "cpu":  # 0/1 spikes cross the bus as bytes: 4x less to copy than float32
            return spikes.to(torch.uint8).cpu().to(self.dtype), scores.cpu()
        return spikes, scores

    @torch.inference_mode()
    def step_device(self, x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``run`` on the device: ``x`` (L, B, *input_shape) and ``idx`` (B,) already there, checked.

        Gathers the slots' state, runs the chunk, scatters the new state back; returns device tensors. One
        step of a sliding-PSN net updates the slots in place instead (``step_slots_`` on CUDA with Triton,
        ``step_slots_exact_`` on the CPU).
        No host synchronisation for a sliding-PSN net (a masked one reads its step counts to check the
        horizon), so bench/engine.py can capture it in a CUDA graph.
        """
        st = self._slots()
        net = self.model.net
        if x.shape[0] == 1 and net.steps_slots_fused(x):  # one kernel per layer, state updated in place
            out = net.step_slots_(x[0], st, idx)
            return out.spikes.unsqueeze(0), out.scores.unsqueeze(0)
        if x.shape[0] == 1 and self._exact_step and not net.training:  # in place, the chunk path's bits
            out = net.step_slots_exact_(x[0], st, idx)
            return out.spikes.unsqueeze(0), out.scores.unsqueeze(0)
        rows = self._gather(idx)
        # The engine has checked shape and finiteness on the host (a GPU check would synchronise); the
        # net streams (max_slots > 0) and a masked neuron still checks its horizon.
        out, new = net.chunk(x, rows, _checked=True)
        self._scatter(idx, new)
        return out.spikes, out.scores

    @property
    def ragged(self) -> bool:
        """True where ``run_ragged`` runs (``PSNNet.chunk_ragged``: sliding-PSN nets)."""
        return self.max_slots > 0 and self.model.net.ragged

    @torch.inference_mode()
    def run_ragged(self, x: Tensor, slots: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``run`` where slot b takes the first ``lengths[b]`` steps of ``x`` (L, B, *input_shape) and the rest
        is padding: outputs (L, B, ...) of which row b's first ``lengths[b]`` steps mean something."""
        idx, lengths = slots.to(self.device), lengths.to(self.device)
        rows = self._gather(idx)
        out, new = self.model.net.chunk_ragged(x.to(self.device, self.dtype), rows, lengths)
        self._scatter(idx, new)
        return self._to_host(out.spikes, out.scores)

    @torch.inference_mode()
    def classify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.net(x.to(self.device, self.dtype))
        return out.spikes.cpu(), out.scores.cpu()
