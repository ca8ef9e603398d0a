"""Pure math of the PSN family (arXiv 2304.12760), written from the paper's equations.

Every function here is pure: inputs are never mutated, state is explicit.
Shapes: ``T`` time steps, ``B`` batch (sessions), ``N`` neurons (all feature axes flattened),
``k`` the order of a masked or sliding PSN.

- PSN:         ``H = W X + b``,            ``W`` (T, T), ``b`` (T,)
- masked PSN:  ``H = (W * M_k) X + b``,    ``M_k[t, i] = 1`` iff ``t - k < i <= t``
- sliding PSN: ``H[t] = sum_i w_i X[t-k+1+i] + b``, ``w`` (k,), inputs before t=0 are zero
- spikes:      ``S = Heaviside(H)``
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.surrogate import spike


class NeuronState(NamedTuple):
    """Streaming state of one PSN layer for a batch of sessions (fixed size per session).

    window: (B, k, *features) the last k inputs, oldest first; zeros before the first step.
    t:      (B,) int64, the number of steps each row has seen.
    """

    window: Tensor
    t: Tensor


def band_mask(k: int, T: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``M_k``: (T, T) with ones where ``t - k < i <= t`` (row t, column i)."""
    rows = torch.arange(T, device=device).unsqueeze(1)
    cols = torch.arange(T, device=device).unsqueeze(0)
    lag = rows - cols  # (T, T)  t - i
    return ((lag >= 0) & (lag < k)).to(dtype)


def relaxed_mask(k: int, T: int, lam: float, *, device=None, dtype=torch.float32) -> Tensor:
    """Training-time mask ``lam * M_k + (1 - lam) * ones`` (lam = 1 is the served, causal mask)."""
    m = band_mask(k, T, device=device, dtype=dtype)
    if lam >= 1.0:
        return m
    return lam * m + (1.0 - lam)


def sliding_matrix(weight: Tensor, T: int) -> Tensor:
    """The banded Toeplitz (T, T) matrix of a sliding PSN: ``W[t, i] = w[k-1-(t-i)]`` for ``0 <= t-i < k``.

    Built by one gather, no Python loop over T.
    """
    k = weight.shape[0]
    rows = torch.arange(T, device=weight.device).unsqueeze(1)
    cols = torch.arange(T, device=weight.device).unsqueeze(0)
    lag = rows - cols  # (T, T)
    inside = (lag >= 0) & (lag < k)
    idx = (k - 1 - lag).clamp(0, k - 1)
    return torch.where(inside, weight[idx], torch.zeros((), dtype=weight.dtype, device=weight.device))


def matrix_forward(x_seq: Tensor, weight: Tensor, bias: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Parallel form ``H = W X + b`` over ``x_seq`` (T, ...); returns ``(spikes, H)`` of the same shape.

    ``bias`` is (T,) (one per step) or a scalar.
    """
    T = x_seq.shape[0]
    x2 = x_seq.reshape(T, -1)  # (T, N)
    b = bias.reshape(-1, 1) if bias.dim() == 1 else bias
    h = torch.addmm(b.expand(T, x2.shape[1]), weight, x2) if x2.shape[1] else weight @ x2
    h = h.reshape(x_seq.shape)
    return spike(h, alpha), h


def initial_state(k: int, batch: int, feature_shape: tuple[int, ...], *, device=None,
                  dtype=torch.float32) -> NeuronState:
    """Zero window and t = 0 for ``batch`` sessions."""
    return NeuronState(
        window=torch.zeros((batch, k, *feature_shape), device=device, dtype=dtype),
        t=torch.zeros((batch,), device=device, dtype=torch.long),
    )


def _context(x_chunk: Tensor, state: NeuronState) -> Tensor:
    """Stored window followed by the new steps, time-first: (k + L, B, N)."""
    L, B = x_chunk.shape[:2]
    k = state.window.shape[1]
    past = state.window.reshape(B, k, -1).transpose(0, 1)  # (k, B, N)
    return torch.cat([past, x_chunk.reshape(L, B, -1)], dim=0)


def _next_state(ctx: Tensor, state: NeuronState, L: int) -> NeuronState:
    k = state.window.shape[1]
    window = ctx[-k:].transpose(0, 1).reshape(state.window.shape)  # (B, k, *features)
    return NeuronState(window=window.contiguous(), t=state.t + L)


BAND_BLOCK = 1 << 17  # elements per block of the band sum's passes (fits in L2): 2-5x faster measured


def band_sum(ctx: Tensor, weights: list[Tensor], L: int) -> Tensor:
    """``H`` (before the bias) of new steps from a time-first context ``ctx``.

    ``L >= 1``: ``ctx`` is (k + L, B, ...) and step l reads ``ctx[l+1 .. l+k]``; ``L = 0``: ``ctx`` is
    the (k, B, ...) window of one step, read whole. ``weights[j]`` multiplies the j-th input read (a
    scalar, or a tensor broadcast over the output, (L, B, 1) for a chunk). The sum runs in one fixed
    order, j = 0 .. k-1, as separate element-wise multiplies and adds (no fused multiply-add, no
    matrix product whose reduction order depends on the shapes): each output element is the same
    float whatever the batch, its neighbours and the chunk length. So the step form, the chunk form
    and a replay after a restart give bit-identical spikes (issue 11). Large chunks run in blocks of
    sessions (element-wise, so blocking cannot change a result), each small enough to stay in cache.
    """
    B = ctx.shape[1]
    per_session = max(L, 1) * ctx[0, 0].numel()
    block = max(1, BAND_BLOCK // max(per_session, 1))
    if L == 0 or block >= B or _out_of_place(ctx, weights):
        return _band_sum(ctx, weights, L)
    out = ctx.new_empty((L, *ctx.shape[1:]))
    for b0 in range(0, B, block):
        rows = slice(b0, b0 + block)
        out[:, rows] = _band_sum(ctx[:, rows], [w[:, rows] if w.dim() > 1 else w for w in weights], L)
    return out


def _out_of_place(ctx: Tensor, weights: list[Tensor]) -> bool:
    """Autograd (training through the step form) or an ONNX trace: no ``out=``, no in-place ops."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and (ctx.requires_grad or any(w.requires_grad for w in weights))


def _band_sum(ctx: Tensor, weights: list[Tensor], L: int) -> Tensor:
    def term(j: int) -> Tensor:
        return ctx[j] if L == 0 else ctx[1 + j:1 + j + L]

    h = torch.mul(term(0), weights[0])
    if _out_of_place(ctx, weights):  # autograd, ONNX export: the same operations, out of place
        for j in range(1, len(weights)):
            h = h + term(j) * weights[j]
    elif len(weights) > 1:
        tmp = torch.empty_like(h)  # in place: fresh temporaries per term measured 7x slower
        for j in range(1, len(weights)):
            h.add_(torch.mul(term(j), weights[j], out=tmp))
    return h


def window_band_sum(rows: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``band_sum`` of one step (``L = 0``) over the windows ``rows`` (B, k, *features), oldest first, with one
    band ``weight`` (k,) for every row (a sliding PSN), bit for bit: the k products in one element-wise
    multiply (into ``out``, (B, k, *features), when given), then added in the same order, j = 0 .. k-1,
    one element-wise add each. k + 2 tensor operations where ``band_sum`` takes 3k: what a step of a few
    sessions costs is mostly their number (``PSNNet.step_slots_exact_``). Inference only (in place)."""
    k = weight.shape[0]
    products = torch.mul(rows, weight.view(1, k, *([1] * (rows.dim() - 2))), out=out).unbind(1)
    h = products[0] if k == 1 else products[0] + products[1]
    for j in range(2, k):
        h.add_(products[j])
    return h


def sliding_chunk(x_chunk: Tensor, state: NeuronState, weight: Tensor, bias: Tensor,
                  alpha: float) -> tuple[Tensor, Tensor, NeuronState]:
    """L new steps ``x_chunk`` (L, B, *features) over the stored window: ``H[t] = sum_i w_i X[t-k+1+i] + b``.

    Returns ``(spikes, H, new_state)``; bit-identical to L single steps (``band_sum``).
    """
    L = x_chunk.shape[0]
    ctx = _context(x_chunk, state)  # (k + L, B, N)
    h = band_sum(ctx, list(weight.unbind(0)), L) + bias
    h = h.reshape(x_chunk.shape)
    return spike(h, alpha), h, _next_state(ctx, state, L)


def sliding_step(x_t: Tensor, state: NeuronState, weight: Tensor, bias: Tensor,
                 alpha: float) -> tuple[Tensor, Tensor, NeuronState]:
    """One step ``x_t`` (B, *features), bit-identical to ``sliding_chunk`` of one step (the same
    ``band_sum`` over the window, without the time-major copies). Returns ``(spikes, H, new_state)``."""
    window = torch.cat([state.window[:, 1:], x_t.unsqueeze(1)], dim=1)  # (B, k, *features)
    h = band_sum(window.transpose(0, 1), list(weight.unbind(0)), 0) + bias  # read as (k, B, ...): no copy
    return spike(h, alpha), h, NeuronState(window=window, t=state.t + 1)


def masked_band_weights(weight: Tensor, t: Tensor, k: int, L: int) -> Tensor:
    """For rows starting at step ``t`` (B,), the band weights of steps t..t+L-1: (B, L, k).

    Entry j of step s multiplies the input at step ``s - k + 1 + j`` (``weight[s, s-k+1+j]``);
    columns before step 0 get weight 0 (their inputs are zeros anyway).
    """
    steps = t.unsqueeze(1) + torch.arange(L, device=t.device)  # (B, L)
    cols = steps.unsqueeze(2) - (k - 1) + torch.arange(k, device=t.device)  # (B, L, k)
    w = weight[steps.unsqueeze(2), cols.clamp(min=0)]
    return torch.where(cols >= 0, w, torch.zeros((), dtype=w.dtype, device=w.device))


def masked_chunk(x_chunk: Tensor, state: NeuronState, weight: Tensor, bias: Tensor, k: int,
                 alpha: float) -> tuple[Tensor, Tensor, NeuronState]:
    """L new steps of a masked PSN (lam = 1) over the stored window; rows may be at different t.

    Row b's step s uses ``weight[s, s-k+1 .. s]``. The caller checks ``t + L <= T``. Returns
    ``(spikes, H, new_state)``; bit-identical to L single steps (``band_sum``).
    """
    L = x_chunk.shape[0]
    ctx = _context(x_chunk, state)  # (k + L, B, N)
    band = masked_band_weights(weight, state.t, k, L).permute(2, 1, 0).unsqueeze(3)  # (k, L, B, 1)
    steps = state.t.unsqueeze(1) + torch.arange(L, device=state.t.device)  # (B, L)
    h = band_sum(ctx, list(band.unbind(0)), L) + bias[steps].transpose(0, 1).unsqueeze(2)
    h = h.reshape(x_chunk.shape)
    return spike(h, alpha), h, _next_state(ctx, state, L)


def masked_step(x_t: Tensor, state: NeuronState, weight: Tensor, bias: Tensor, k: int,
                alpha: float) -> tuple[Tensor, Tensor, NeuronState]:
    """One step of a masked PSN (lam = 1): row b uses ``weight[t_b, t_b-k+1 .. t_b]``; bit-identical
    to ``masked_chunk`` of one step."""
    window = torch.cat([state.window[:, 1:], x_t.unsqueeze(1)], dim=1)  # (B, k, *features)
    B = window.shape[0]
    band = masked_band_weights(weight, state.t, k, 1)[:, 0].T.reshape(k, B, *([1] * (x_t.dim() - 1)))
    h = band_sum(window.transpose(0, 1), list(band.unbind(0)), 0)
    h = h + bias[state.t].reshape((B,) + (1,) * (x_t.dim() - 1))
    return spike(h, alpha), h, NeuronState(window=window, t=state.t + 1)


def lif_charge(v: Tensor, x_t: Tensor, tau: float) -> Tensor:
    """One step of leaky integration: ``v + (x - v) / tau``."""
    return v + (x_t - v) / tau


def lif_reset(v: Tensor, s: Tensor) -> Tensor:
    """Hard reset to 0 where the neuron spiked (``s`` = 1)."""
    return v * (1.0 - s)


def lif_step(x_t: Tensor, v: Tensor, tau: float, v_threshold: float, alpha: float) -> tuple[Tensor, Tensor]:
    """Leaky integrate-and-fire with hard reset to 0 (the paper's serial baseline).

    ``v <- v + (x - v) / tau``; ``s = Heaviside(v - v_th)``; ``v <- v * (1 - s)``.
    """
    v = lif_charge(v, x_t, tau)
    s = spike(v - v_threshold, alpha)
    return s, lif_reset(v, s)


def lif_forward(x_seq: Tensor, tau: float, v_threshold: float, alpha: float,
                v0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LIF over ``x_seq`` (T, ...) as a loop over time. Returns ``(spikes, v_final)``."""
    v = torch.zeros_like(x_seq[0]) if v0 is None else v0
    out = []
    for x_t in x_seq:
        s, v = lif_step(x_t, v, tau, v_threshold, alpha)
        out.append(s)
    return torch.stack(out), v


def lif_scan(x_seq: Tensor, tau: float, v_threshold: float) -> tuple[Tensor, Tensor]:
    """Inference-only LIF over ``x_seq`` (T, ...): ``(spikes, v - v_th before the reset)`` per step.

    The same dynamics as ``lif_step`` without the surrogate, in plain tensor ops so that TorchScript
    compiles it (the ONNX export keeps it as a ``Loop`` over T) and the parity check reads membranes.
    """
    v = torch.zeros_like(x_seq[0])
    spikes = torch.empty_like(x_seq)
    membrane = torch.empty_like(x_seq)
    for i in range(x_seq.shape[0]):
        v = lif_charge(v, x_seq[i], tau)
        m = v - v_threshold
        s = (m >= 0).to(x_seq.dtype)
        spikes[i] = s
        membrane[i] = m
        v = lif_reset(v, s)
    return spikes, membrane


def running_mean(per_step: Tensor, score_sum: Tensor | None = None,
                 seen: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The network's answer: the mean of its per-step readouts so far.

    ``per_step`` (L, B, C) are L new readouts after ``seen`` (B,) earlier steps whose readouts sum to
    ``score_sum`` (B, C) (both None: a fresh start). Returns the scores after each new step (L, B, C)
    and the new sum (B, C). The parallel form, the chunk form and the parallel ONNX graph answer through
    this function; single steps through ``running_mean_step``, its L = 1 case.
    """
    scores, sums = running_sums(per_step, score_sum, seen)
    return scores, sums[-1]


def running_sums(per_step: Tensor, score_sum: Tensor | None = None,
                 seen: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``running_mean`` with the sum after every new step (L, B, C) instead of the last one only (rows
    that stop at different steps: ``PSNNet.chunk_ragged``)."""
    L = per_step.shape[0]
    if score_sum is None:
        sums = per_step.cumsum(0)
    else:  # ((sum + r0) + r1) + ..., in the dtype, as single steps add: chunking changes no bit (``cumsum``
        # accumulates float32 in float64 on the CPU and rounds once: other bits than step after step)
        acc, rows = score_sum, []
        for r in per_step.unbind(0):
            acc = acc + r
            rows.append(acc)
        sums = torch.stack(rows)
    steps = torch.arange(1, L + 1, device=per_step.device, dtype=per_step.dtype).reshape(L, 1, 1)
    if seen is not None:
        steps = steps + seen.to(per_step.dtype).reshape(1, -1, 1)
    return sums / steps, sums


def running_mean_step(per_step: Tensor, score_sum: Tensor, seen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``running_mean`` for one new readout ``per_step`` (B, C): ``(scores (B, C), new sum, seen + 1)``.

    Written out without the cumulative sum and step range so that the exported step graph stays a few
    element-wise ops (the fused slot step and ``model_step.onnx`` use it); equal to ``running_mean``
    with L = 1 (tests/test_network.py checks it).
    """
    sums = score_sum + per_step
    seen = seen + 1
    return sums / seen.unsqueeze(1).to(sums.dtype), sums, seen


def masked_batch_norm(bn: nn.BatchNorm1d, y: Tensor, valid: Tensor) -> Tensor:
    """Training-mode batch norm of ``y`` (M, C) or (M, C, L) with statistics over the ``valid`` rows only.

    Every row is normalised with them; the running statistics are updated as ``bn`` itself would
    (momentum, unbiased variance) from the valid rows.
    """
    dims = [0] + list(range(2, y.dim()))  # every axis but the channel axis
    yv = y[valid]
    mean = yv.mean(dims)
    var = yv.var(dims, unbiased=False)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        n = yv.numel() / yv.shape[1]
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 0.1
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
    shape = [1, -1] + [1] * (y.dim() - 2)
    out = (y - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out
