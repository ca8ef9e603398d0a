"""Networks of PSN-family neurons, built from a config alone.

Each layer maps the features of one step (linear, or a 1-D convolution over the features),
optionally batch-normalises, then feeds a spiking neuron over time. A linear readout of the last
spiking layer gives class scores per step; the network answers the mean over the steps seen so far
(the paper reads out the mean over time).

Parallel form: ``forward(x_seq)`` over (T, B, *input_shape).
Step form: ``initial_state(B)``, ``step(x_t, state)``, ``chunk(x_chunk, state)``: pure, over a
fixed-size ``NetState``; equal to the parallel form step for step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.checks import InputError, check_tensor, check_trailing_shape
from model.config import LayerConfig, NetConfig, _as_tuple, normalise
from model.functional import (
    NeuronState,
    masked_batch_norm,
    running_mean,
    running_mean_step,
    running_sums,
    window_band_sum,
)
from model.kernels import fused_available, sliding_step_slots_
from model.kinds import NEURONS, STREAMING_NEURONS
from model.neurons import LIF, PSN, MaskedPSN, SlidingPSN


class NetState(NamedTuple):
    """Streaming state of a whole network for B sessions; every tensor has a leading B axis."""

    neurons: tuple[NeuronState, ...]  # one per spiking layer
    score_sum: Tensor  # (B, num_classes) sum of per-step readouts so far
    t: Tensor  # (B,) int64 steps seen


class NetOutput(NamedTuple):
    spikes: Tensor  # (T, B, *last layer features) spikes of the last spiking layer
    scores: Tensor  # (T, B, num_classes) mean readout over steps 0..t


ROW_TILE = 16  # the step form's matrix products run on a multiple of this many rows (``current_rows``)


def _make_neuron(cfg: NetConfig) -> nn.Module:
    if cfg.neuron == "masked":
        return MaskedPSN(cfg.k, cfg.T, alpha=cfg.alpha, validate=False)  # type: ignore[arg-type]
    if cfg.neuron == "sliding":
        return SlidingPSN(cfg.k, alpha=cfg.alpha, validate=False)
    if cfg.neuron == "psn":
        return PSN(cfg.T, alpha=cfg.alpha, validate=False)  # type: ignore[arg-type]
    return LIF(tau=cfg.lif_tau, alpha=cfg.alpha, validate=False)


class SpikingLayer(nn.Module):
    """Per-step map (linear or conv over features) -> optional batch norm -> spiking neuron."""

    def __init__(self, layer: LayerConfig, in_shape: tuple[int, ...], cfg: NetConfig):
        super().__init__()
        self.kind = layer.kind
        if layer.kind == "linear":
            self.op: nn.Module = nn.Linear(math.prod(in_shape), layer.out)
            self.out_shape: tuple[int, ...] = (layer.out,)
        else:
            if len(in_shape) != 2:
                raise ValueError(f"conv layer needs (channels, length) input, got {in_shape}")
            c, n = in_shape
            self.op = nn.Conv1d(c, layer.out, layer.kernel_size, stride=layer.stride, padding=layer.kernel_size // 2)
            self.out_shape = (layer.out, (n + 2 * (layer.kernel_size // 2) - layer.kernel_size) // layer.stride + 1)
        self.bn = nn.BatchNorm1d(layer.out) if layer.batch_norm else None
        self.neuron = _make_neuron(cfg)

    def current(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Input current of the neuron for ``x`` (M, *in_shape) -> (M, *out_shape); M = any rows.

        ``valid`` (M,) bool, training only: batch norm takes its statistics from these rows alone
        (the others are padding of variable-length sequences).
        """
        if self.kind == "linear":
            x = x.flatten(1)
        y = self.op(x)
        if self.bn is None:
            return y
        if valid is None or not self.training:
            return self.bn(y)
        return masked_batch_norm(self.bn, y, valid)

    def current_rows(self, x: Tensor) -> Tensor:
        """``current`` for the step form, batch-invariant (``by_rows``)."""
        return by_rows(self.current, x)

    def current_steps(self, h: Tensor) -> Tensor:
        """``current_rows`` over steps: (L, B, *in) -> (L, B, *out)."""
        L, B = h.shape[:2]
        cur = self.current_rows(h.reshape(L * B, *h.shape[2:]))
        return cur.reshape(L, B, *cur.shape[1:])


def by_rows(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` for a row-wise ``fn`` built on matrix products, batch-invariant: row i's result does
    not depend on the other rows or their number. A matrix product may sum in another order for
    another number of rows (on this CPU a product of 1-7 rows differs from the same rows inside a
    larger one, and with 256 inputs one of 8 rows from one of 16 or more; row counts that are
    multiples of ``ROW_TILE`` = 16 measured invariant from 16 to 4,096), so the rows are padded with
    zeros to a multiple of ``ROW_TILE`` (tests/test_network.py checks it on the machine at hand, for
    the shipped models too). Used by the step form for each layer's input current and the readout."""
    pad = -x.shape[0] % ROW_TILE
    if not pad:
        return fn(x)
    return fn(torch.cat([x, x.new_zeros(pad, *x.shape[1:])]))[:x.shape[0]]


class PSNNet(nn.Module):
    """A spiking network from a ``NetConfig``; ``forward`` is parallel, ``step``/``chunk`` stream."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        shape = cfg.input_shape
        layers = []
        for layer_cfg in cfg.layers:
            layer = SpikingLayer(layer_cfg, shape, cfg)
            layers.append(layer)
            shape = layer.out_shape
        self.layers = nn.ModuleList(layers)
        self.out_shape = shape
        self.readout = nn.Linear(math.prod(shape), cfg.num_classes)

    # ----- parallel form -------------------------------------------------------------------
    def forward(self, x_seq: Tensor, lengths: Tensor | None = None) -> NetOutput:
        """``x_seq`` (T, B, *input_shape) -> spikes (T, B, *out_shape), running-mean scores (T, B, C).

        ``lengths`` (B,): valid steps of each sequence, the rest padding. Every layer is causal, so the
        outputs up to a sequence's last step never see its padding; in training, batch norm also takes
        its statistics from the valid steps only. (Read each answer at its own last step:
        ``model.data.final_scores``.)
        """
        self._check_input(x_seq, "x_seq", "T, B")
        T, B = x_seq.shape[:2]
        kd = self.cfg.kind
        if kd.exact_T and T != self.cfg.T:
            raise InputError(f"x_seq: a {kd.label} network needs exactly T={self.cfg.T} steps, got {T}")
        if kd.horizon and T > self.cfg.T:  # type: ignore[operator]
            raise InputError(f"x_seq: {kd.label} network has a fixed horizon T={self.cfg.T}, got {T} steps")
        valid = None
        if lengths is not None and self.training:
            valid = (torch.arange(T, device=x_seq.device).unsqueeze(1) < lengths.unsqueeze(0)).reshape(T * B)
        return self.parallel(x_seq, valid)

    def parallel(self, x_seq: Tensor, valid: Tensor | None = None,
                 neuron_forward: Callable[[nn.Module, Tensor], Tensor] | None = None) -> NetOutput:
        """The parallel form without the input checks: plain tensor ops, so the ONNX export traces this
        very code (``exported.graphs.ParallelGraph``). ``valid`` (T*B,): see ``forward``;
        ``neuron_forward(neuron, current)`` replaces ``neuron(current)`` (the export's LIF loop)."""
        T, B = x_seq.shape[0], x_seq.shape[1]
        h = self._normalise(x_seq)
        for layer in self.layers:
            cur = layer.current(h.flatten(0, 1), valid)  # (T*B, *out)
            cur = cur.reshape(T, B, *cur.shape[1:])  # (T, B, *out)
            h = layer.neuron(cur) if neuron_forward is None else neuron_forward(layer.neuron, cur)
        scores, _ = running_mean(self.readout(h.reshape(T, B, -1)))  # (T, B, C)
        return NetOutput(spikes=h, scores=scores)

    # ----- step form -----------------------------------------------------------------------
    def initial_state(self, batch: int, *, device=None, dtype: torch.dtype | None = None) -> NetState:
        self._check_streams()
        p = self.readout.weight
        device, dtype = device or p.device, dtype or p.dtype
        neurons = tuple(layer.neuron.initial_state(batch, layer.out_shape, device=device, dtype=dtype)
                        for layer in self.layers)
        return NetState(neurons=neurons, score_sum=torch.zeros(batch, self.cfg.num_classes, device=device, dtype=dtype),
                        t=torch.zeros(batch, dtype=torch.long, device=device))

    def step(self, x_t: Tensor, state: NetState) -> tuple[NetOutput, NetState]:
        """One step ``x_t`` (B, *input_shape) -> (spikes (B, *out), scores (B, C)), new state."""
        self._check_streams()
        self._check_input(x_t, "x_t", "B")
        out, new = self.chunk(x_t.unsqueeze(0), state, _checked=True)
        return NetOutput(out.spikes[0], out.scores[0]), new

    def chunk(self, x_chunk: Tensor, state: NetState, *, _checked: bool = False) -> tuple[NetOutput, NetState]:
        """L new steps ``x_chunk`` (L, B, *input_shape) over the stored state, in parallel form.

        Equal to L calls of ``step``. Returns spikes (L, B, *out), scores (L, B, C) and the new state.
        """
        if not _checked:
            self._check_streams()
            self._check_input(x_chunk, "x_chunk", "L, B")
        L, B = x_chunk.shape[:2]
        if state.score_sum.shape[0] != B:
            raise InputError(f"state: holds {state.score_sum.shape[0]} sessions, input has {B}")
        h = self._normalise(x_chunk)
        new_neurons = []
        for layer, ns in zip(self.layers, state.neurons, strict=True):
            cur = layer.current_steps(h)  # (L, B, *out)
            if L == 1:
                s, ns = layer.neuron.step(cur[0], ns)
                h = s.unsqueeze(0)
            else:
                h, ns = layer.neuron.chunk(cur, ns)
            new_neurons.append(ns)
        scores, score_sum = running_mean(self._logits(h), state.score_sum, state.t)  # (L, B, C)
        new = NetState(neurons=tuple(new_neurons), score_sum=score_sum, t=state.t + L)
        return NetOutput(spikes=h, scores=scores), new

    def _logits(self, h: Tensor) -> Tensor:
        """The readout of the last layer's spikes (L, B, *out) -> (L, B, C), batch-invariant."""
        L, B = h.shape[:2]
        return by_rows(self.readout, h.reshape(L * B, -1)).reshape(L, B, -1)

    @property
    def sliding_only(self) -> bool:
        """Every neuron a sliding PSN."""
        return all(isinstance(layer.neuron, SlidingPSN) for layer in self.layers)

    @property
    def ragged(self) -> bool:
        """True where ``chunk_ragged`` runs: every neuron a sliding PSN, whose state is its window of recent
        inputs (a masked PSN's weights end at its horizon, which padding steps could pass; LIF keeps a
        membrane that only its last step holds)."""
        return self.sliding_only

    def chunk_ragged(self, x_chunk: Tensor, state: NetState, lengths: Tensor) -> tuple[NetOutput, NetState]:
        """``chunk`` for rows that take different numbers of new steps, in one pass: row b takes the first
        ``lengths[b]`` (1..L) of the L steps of ``x_chunk`` (L, B, *input_shape); the rest is padding,
        whose outputs mean nothing. Every layer is causal, so a row's outputs up to its last step are
        those of ``chunk`` over its own steps, bit for bit (the band sum is element-wise, the matrix
        products batch-invariant: ``by_rows``), and its new state is taken at its own last step: each
        neuron's window of the k inputs up to it, its score sum after it, its step count.

        One pass instead of one per distinct length (``service/core/engine.py`` chooses): a small call
        costs a CPU a fixed few hundred microseconds, a padding row a few. Sliding-PSN nets (``ragged``)."""
        if not self.ragged:
            raise InputError("chunk_ragged: every neuron of the net must be a sliding PSN")
        L, B = x_chunk.shape[:2]
        if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > L:
            raise InputError(f"lengths: expected ({B},) step counts in 1..{L}")
        rows = torch.arange(B, device=lengths.device).unsqueeze(1)
        h = self._normalise(x_chunk)
        new_neurons = []
        for layer, ns in zip(self.layers, state.neurons, strict=True):
            cur = layer.current_steps(h)  # (L, B, *out)
            h, _ = layer.neuron.chunk(cur, ns)
            k = ns.window.shape[1]
            ctx = torch.cat([ns.window, cur.transpose(0, 1)], dim=1)  # (B, k + L, *out): window, then the steps
            take = lengths.unsqueeze(1) + torch.arange(k, device=lengths.device)  # the k inputs up to each end
            new_neurons.append(NeuronState(window=ctx[rows, take].contiguous(), t=ns.t + lengths))
        scores, sums = running_sums(self._logits(h), state.score_sum, state.t)  # (L, B, C)
        new = NetState(neurons=tuple(new_neurons), score_sum=sums[lengths - 1, rows[:, 0]], t=state.t + lengths)
        return NetOutput(spikes=h, scores=scores), new

    @torch.no_grad()
    def replay(self, x: Tensor, state: NetState) -> NetState:
        """The state after ``x`` (n, B, *input_shape), the last ``n = replay_steps`` inputs of sessions,
        from zero windows at steps ``state.t`` (score sums are the caller's). Equal, for every later
        step, to the state the sessions had (bit for bit: the step form is batch-invariant).

        Each layer is computed only where a later layer reads it: layer j starts (k-1) steps after
        layer j-1 (the outputs it drops there read the zero windows), so a net of 4 layers does 62%
        of the work of ``chunk`` over the same inputs. Other ``n`` (a session younger than its
        receptive field, replayed from step 0): ``chunk``.
        """
        n = x.shape[0]
        if n != self.replay_steps or n == 0:
            return self.chunk(x, state, _checked=True)[1]
        k = self.cfg.k  # type: ignore[assignment]
        h = self._normalise(x)
        neurons = []
        for j, (layer, ns) in enumerate(zip(self.layers, state.neurons, strict=True)):
            start = NeuronState(ns.window, ns.t + j * (k - 1))
            s, new = layer.neuron.chunk(layer.current_steps(h), start)
            neurons.append(new)
            h = s[k - 1:]
        return NetState(neurons=tuple(neurons), score_sum=state.score_sum, t=state.t + n)

    # ----- slot tables (the service's session state) ------------------------------------
    def steps_slots_fused(self, x_t: Tensor) -> bool:
        """True where ``step_slots_`` runs for inputs like ``x_t``: a sliding-PSN net in eval mode, and the
        fused kernels available (Triton, a CUDA float32 tensor, PSN_FUSED not 0)."""
        return not self.training and fused_available(x_t) and self.sliding_only

    @torch.no_grad()
    def step_slots_(self, x_t: Tensor, state: NetState, idx: Tensor) -> NetOutput:
        """One step ``x_t`` (B, *input_shape) for the sessions in rows ``idx`` (B,) of a slot-table
        ``state``, updated in place by one fused kernel per layer (see ``kernels.sliding_step_slots_``).

        Same as ``chunk`` on the gathered rows with the new state scattered back, without the gather
        and scatter copies. Sliding-PSN nets only; ``x_t`` already checked. Returns (B, ...) outputs.
        """
        h = self._normalise(x_t)
        for layer, ns in zip(self.layers, state.neurons, strict=True):
            cur = layer.current_rows(h)  # (B, *out)
            h = sliding_step_slots_(ns.window, ns.t, idx, cur, layer.neuron.weight, layer.neuron.bias)
        scores, sums, t = running_mean_step(by_rows(self.readout, h.reshape(h.shape[0], -1)),
                                            state.score_sum.index_select(0, idx), state.t.index_select(0, idx))
        state.score_sum.index_copy_(0, idx, sums)
        state.t.index_copy_(0, idx, t)
        return NetOutput(spikes=h, scores=scores)

    @torch.no_grad()
    def step_slots_exact_(self, x_t: Tensor, state: NetState, idx: Tensor) -> NetOutput:
        """``step_slots_`` in plain tensor operations, bit for bit ``chunk`` of one step on the rows ``idx`` (B,)
        gathered, the new state scattered back: the same matrix products (``by_rows``), the band sum in the
        same order (``functional.window_band_sum``), the running mean's L = 1 case (``running_sums``, also
        past 2^24 steps). Each neuron reads its rows' windows once and writes them back shifted, in place.

        About half the tensor operations of gather, ``chunk``, scatter (bench net: 66 against 119), each a
        microsecond or more of dispatch on a CPU, where a step of a few sessions costs about its number of
        operations (the CPU backend's one-step path). Sliding-PSN nets in eval mode; ``x_t`` (B,
        *input_shape) already checked; ``idx`` distinct. Returns (B, ...) outputs.
        """
        h = self._normalise(x_t)
        one = torch.ones_like(idx)
        for layer, ns in zip(self.layers, state.neurons, strict=True):
            cur = layer.current_rows(h)  # (B, *out)
            past = ns.window.index_select(0, idx)  # (B, k, *out)
            rows = torch.cat([past[:, 1:], cur.unsqueeze(1)], dim=1)  # the new windows
            ns.window.index_copy_(0, idx, rows)
            ns.t.index_add_(0, idx, one)
            neuron = layer.neuron
            h = window_band_sum(rows, neuron.weight, out=past).add_(neuron.bias).ge_(0)  # spikes (functional.spike)
        sums = state.score_sum.index_select(0, idx) + by_rows(self.readout, h.reshape(h.shape[0], -1))
        scores = sums / (state.t.index_select(0, idx).to(sums.dtype) + 1).unsqueeze(1)
        state.score_sum.index_copy_(0, idx, sums)
        state.t.index_add_(0, idx, one)
        return NetOutput(spikes=h, scores=scores)

    # ----- helpers -------------------------------------------------------------------------
    def _normalise(self, x: Tensor) -> Tensor:
        return normalise(self.cfg, x)

    def _check_streams(self) -> None:
        if not self.cfg.streams:
            raise InputError(f"a '{self.cfg.neuron}' network has no step form (it needs the whole sequence)")
        if self.training and any(layer.bn is not None for layer in self.layers):
            raise InputError("step form needs eval mode (batch norm uses running statistics); call .eval()")
        for layer in self.layers:
            if isinstance(layer.neuron, MaskedPSN) and layer.neuron.lam < 1.0:
                raise InputError(f"masked PSN cannot stream with lam={layer.neuron.lam} < 1; set lam = 1.0")

    def _check_input(self, x: Tensor, name: str, lead: str) -> None:
        check_tensor(x, name)
        p = self.readout.weight
        if x.dtype != p.dtype:
            raise InputError(f"{name}: expected dtype {p.dtype}, got {x.dtype}")
        check_trailing_shape(x, name, lead, self.cfg.input_shape)
        if x.numel() == 0:  # no step or no session: nothing to answer (the readout cannot shape an empty batch)
            raise InputError(f"{name}: expected shape ({lead}, ...) with {lead} >= 1, got {tuple(x.shape)}")

    def set_lam(self, lam: float) -> None:
        """Set the masked PSN mask relaxation of every layer (no-op for other neurons)."""
        for layer in self.layers:
            if isinstance(layer.neuron, MaskedPSN):
                layer.neuron.lam = float(lam)

    def fused(self) -> PSNNet:
        """A copy in eval mode with every batch norm folded into the preceding linear/conv map.

        Inference-time batch norm is an affine map per feature, so the fold is exact up to rounding.
        """
        net = copy.deepcopy(self).eval()
        for layer in net.layers:
            if layer.bn is None:
                continue
            bn = layer.bn
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # (out,)
            shift = bn.bias.detach() - bn.running_mean * scale
            w = layer.op.weight.detach()
            layer.op.weight.data = w * scale.view(-1, *([1] * (w.dim() - 1)))
            layer.op.bias.data = layer.op.bias.detach() * scale + shift
            layer.bn = None
        return net

    @property
    def replay_steps(self) -> int | None:
        """How many of a session's last inputs rebuild its streaming state exactly (score sum and step
        count aside), or None when no finite number does (LIF: its membrane carries all history).

        A masked or sliding PSN layer of order k keeps k-1 past inputs; each layer's inputs at those
        steps read k-1 steps further back in the layer below, so a net of n such layers depends on its
        last n(k-1) inputs (the paper's finite receptive field). Replaying them from zero windows at
        step t - n(k-1) (a masked PSN also needs its t) reproduces the state bit for bit, given a
        batch-invariant step form."""
        if not self.cfg.kind.has_k or not self.cfg.streams:
            return None
        return len(self.layers) * (self.cfg.k - 1)  # type: ignore[operator]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def max_input(self) -> float:
        """The largest input magnitude this net takes in its dtype: with every input value within
        ``+-max_input``, the first layer's normalised input, its current and its membrane ``H`` are finite
        whatever the signs (bounded by sums of absolute weights, with room for rounding). Past it an inf could
        reach ``H = W X``, where the parallel form's ``0 * inf`` is NaN at *earlier* steps: a later input
        would change earlier outputs, and the whole-sequence answer would no longer equal streaming."""
        dtype = next(self.parameters()).dtype
        fmax, eps = float(torch.finfo(dtype).max), float(torch.finfo(dtype).eps)
        layer = self.layers[0]
        w = layer.op.weight.detach().double().abs().flatten(1)  # (out, fan-in): a conv's taps and channels
        per_out = w.sum(1)  # |current_j| <= per_out_j * max|u| + |bias_j|
        bias = layer.op.bias.detach().double().abs()
        scale, shift = torch.ones_like(per_out), torch.zeros_like(per_out)
        if layer.bn is not None:  # eval: (y - mean) * s + beta
            bn = layer.bn
            scale = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs()
            shift = scale * bn.running_mean.detach().double().abs() + bn.bias.detach().double().abs()
        neuron = layer.neuron
        if isinstance(neuron, LIF):  # v is a running mix of the currents: |v| <= max|current|
            rows, nb = 1.0, abs(float(neuron.v_threshold))
        else:
            W = neuron.weight if isinstance(neuron, SlidingPSN) else neuron.effective_weight(self.cfg.T)
            rows = max(1.0, float(W.detach().double().abs().reshape(-1, W.shape[-1]).sum(-1).max()))
            nb = float(neuron.bias.detach().double().abs().max())
        # In units of fmax (so that no step of this sum overflows float64 itself)
        limit = 1.0 / (1.0 + 4.0 * (w.shape[1] + rows + 4) * eps)  # rounding of the sums, in either order
        current = (limit - nb / fmax) / rows  # |H| <= rows * max|current| + |b| <= limit
        # max|u| such that y_j = per_out_j * u + bias_j <= limit (the map's own output, before a batch norm)
        # and scale_j * y_j + shift_j <= current, for every output j
        room = torch.clamp((current - shift / fmax) / scale, max=limit) - bias / fmax
        u = float((room / per_out.clamp_min(1e-300)).min())
        mean = max(abs(v) for v in _as_tuple(self.cfg.input_mean))
        std = min(_as_tuple(self.cfg.input_std))
        x = min(u, limit) * std * (1.0 - 4.0 * eps) - mean / fmax  # |x - mean| / std <= u
        return fmax * max(0.0, min(x, 1.0))


def state_size_bytes(net: PSNNet) -> int:
    """Bytes of streaming state per session (all windows, score sum, step counter)."""
    st = net.initial_state(1)
    tensors = [t for ns in st.neurons for t in ns] + [st.score_sum, st.t]
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["LayerConfig", "NetConfig", "NetState", "NetOutput", "PSNNet", "NEURONS", "STREAMING_NEURONS",
           "state_size_bytes", "normalise"]
