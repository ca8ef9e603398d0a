"""Optional fused GPU kernels (Triton): ``S = Heaviside(W X + b)`` in one pass, and the streaming step.

The plain PyTorch path writes ``H`` to memory and reads it back for the threshold; these kernels keep
each tile of ``H`` in registers, so ``X`` is read once and ``S`` written once (the byte floor of the
parallel form). Inference only (no autograd). Used where Triton and a CUDA tensor are present, or
under ``TRITON_INTERPRET=1`` for testing on a CPU.

- ``psn_forward_fused``: any (T, T) weight, one ``tl.dot`` per (T, BLOCK_N) tile (the full PSN, a
  masked PSN with a relaxed mask).
- ``psn_forward_banded``: a band of order k (masked PSN with lam = 1, sliding PSN): ``k`` shifted
  multiply-adds per output, no matrix product; the k shifted reads of a tile hit the cache, so DRAM
  sees each input about once. Exact fp32 arithmetic (only the summation order differs).
- ``sliding_step_slots_``: the streaming step of a sliding PSN over a slot table, in place: for each
  row, read its slot's window once, shift it, append the new input, write it back once, threshold
  (the state-byte floor of a step; the PyTorch path gathers, concatenates and scatters).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton is optional: absent on CPU-only installs
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _psn_fwd_kernel(w_ptr, b_ptr, x_ptr, s_ptr, T, N, bias_stride,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        offs_t = tl.arange(0, BLOCK_T)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok = offs_t < T
        w = tl.load(w_ptr + offs_t[:, None] * T + offs_t[None, :], mask=t_ok[:, None] & t_ok[None, :], other=0.0)
        xmask = t_ok[:, None] & (offs_n[None, :] < N)
        x = tl.load(x_ptr + offs_t[:, None] * N + offs_n[None, :], mask=xmask, other=0.0)
        h = tl.dot(w, x, input_precision=PRECISION)
        b = tl.load(b_ptr + offs_t * bias_stride, mask=t_ok, other=0.0)
        h = h + b[:, None]
        s = tl.where(h >= 0, 1.0, 0.0)
        tl.store(s_ptr + offs_t[:, None] * N + offs_n[None, :], s.to(s_ptr.dtype.element_ty), mask=xmask)

    @triton.jit
    def _band_fwd_kernel(wb_ptr, b_ptr, x_ptr, s_ptr, T, N, band_stride, bias_stride,
                         K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_t = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok = offs_t < T
        n_ok = offs_n < N
        h = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(K):  # band entry j multiplies the input at step t - K + 1 + j
            src = offs_t - (K - 1) + j
            ok = t_ok & (src >= 0)
            w = tl.load(wb_ptr + offs_t * band_stride + j, mask=ok, other=0.0)
            x = tl.load(x_ptr + src[:, None] * N + offs_n[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
            h += w[:, None] * x
        b = tl.load(b_ptr + offs_t * bias_stride, mask=t_ok, other=0.0)
        h = h + b[:, None]
        s = tl.where(h >= 0, 1.0, 0.0)
        tl.store(s_ptr + offs_t[:, None] * N + offs_n[None, :], s.to(s_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _sliding_slots_kernel(win_ptr, t_ptr, idx_ptr, cur_ptr, w_ptr, b_ptr, s_ptr, B, F,
                              K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_f = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        r_ok = rows < B
        slots = tl.load(idx_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        ok = r_ok[:, None] & (offs_f < F)[None, :]
        base = win_ptr + slots[:, None] * (K * F) + offs_f[None, :]  # window entry 0 of each row's slot
        rowf = rows.to(tl.int64)[:, None] * F + offs_f[None, :]
        x = tl.load(cur_ptr + rowf, mask=ok, other=0.0)
        h = tl.load(w_ptr + (K - 1)) * x  # weight[k-1] multiplies the current input
        for j in tl.static_range(K - 1):  # entry j+1 moves to j; it is read before entry j+1 is written
            v = tl.load(base + (j + 1) * F, mask=ok, other=0.0)
            h += tl.load(w_ptr + j) * v
            tl.store(base + j * F, v, mask=ok)
        tl.store(base + (K - 1) * F, x, mask=ok)
        h = h + tl.load(b_ptr)
        tl.store(s_ptr + rowf, tl.where(h >= 0, 1.0, 0.0).to(s_ptr.dtype.element_ty), mask=ok)
        if pid_f == 0:
            t = tl.load(t_ptr + slots, mask=r_ok, other=0)
            tl.store(t_ptr + slots, t + 1, mask=r_ok)


def fused_available(x: Tensor) -> bool:
    """True where the fused kernel runs: Triton installed, a CUDA float32 tensor, not disabled by PSN_FUSED=0."""
    return HAVE_TRITON and x.is_cuda and x.dtype == torch.float32 and os.environ.get("PSN_FUSED", "1") != "0"


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the fused PSN kernels need Triton (pip install triton)")


PRECISIONS = ("ieee", "tf32x3", "tf32")


def psn_forward_fused(x_seq: Tensor, weight: Tensor, bias: Tensor, *, precision: str = "ieee",
                      block_n: int | None = None, num_warps: int = 4) -> Tensor:
    """Spikes of ``W X + b`` for ``x_seq`` (T, ...) float32; ``weight`` (T, T) effective; bias (T,) or scalar.

    ``precision``: ``"ieee"`` full fp32 products (same spikes as the PyTorch path away from ties);
    ``"tf32x3"`` three TF32 tensor-core products that recover about fp32 accuracy; ``"tf32"`` one
    (fastest, ~1e-3 relative error in ``H``).
    """
    _require_triton()
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    T = x_seq.shape[0]
    x2 = x_seq.reshape(T, -1).contiguous()
    N = x2.shape[1]
    s = torch.empty_like(x2)
    w = weight.detach().contiguous().to(x2.dtype)
    b = bias.detach().to(x2.dtype).reshape(-1).contiguous()
    block_t = max(16, triton.next_power_of_2(T))
    if block_n is None:
        block_n = 128 if block_t <= 32 else 64
    grid = (triton.cdiv(N, block_n),)
    _psn_fwd_kernel[grid](w, b, x2, s, T, N, 1 if b.numel() > 1 else 0,
                          BLOCK_T=block_t, BLOCK_N=block_n, PRECISION=precision,
                          num_warps=num_warps)
    return s.reshape(x_seq.shape)


def psn_forward_banded(x_seq: Tensor, band: Tensor, bias: Tensor, *, block_t: int = 8, block_n: int = 256,
                       num_warps: int = 4) -> Tensor:
    """Spikes of a banded ``W X + b`` for ``x_seq`` (T, ...) float32.

    ``band`` is (k,) for one band shared by every step (sliding PSN) or (T, k) per step (masked PSN);
    entry j of step t multiplies the input at step ``t - k + 1 + j`` (inputs before step 0 are zero).
    ``bias`` is (T,) or a scalar.
    """
    _require_triton()
    T = x_seq.shape[0]
    x2 = x_seq.reshape(T, -1).contiguous()
    N = x2.shape[1]
    s = torch.empty_like(x2)
    wb = band.detach().to(x2.dtype).contiguous()
    if wb.dim() == 2 and wb.shape[0] < T:
        raise ValueError(f"band: expected (k,) or (T, k) with T >= {T}, got {tuple(wb.shape)}")
    k = wb.shape[-1]
    b = bias.detach().to(x2.dtype).reshape(-1).contiguous()
    grid = (triton.cdiv(N, block_n), triton.cdiv(T, block_t))
    _band_fwd_kernel[grid](wb, b, x2, s, T, N, k if wb.dim() == 2 else 0, 1 if b.numel() > 1 else 0,
                           K=k, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=num_warps)
    return s.reshape(x_seq.shape)


def sliding_step_slots_(window: Tensor, t: Tensor, idx: Tensor, current: Tensor, weight: Tensor,
                        bias: Tensor) -> Tensor:
    """One sliding-PSN step for the sessions in slots ``idx``, updating the slot table in place.

    ``window`` (S, k, *F) contiguous float32 and ``t`` (S,) int64: the neuron's state for S slots;
    ``idx`` (B,) distinct slots; ``current`` (B, *F) this step's input current; ``weight`` (k,),
    ``bias`` scalar. Afterwards ``window[idx]`` holds the last k inputs and ``t[idx]`` is one more.
    Returns the spikes (B, *F). Same as ``functional.sliding_step`` on the gathered rows.
    """
    _require_triton()
    k, B = window.shape[1], idx.shape[0]
    if not window.is_contiguous() or tuple(current.shape) != (B, *window.shape[2:]):
        raise ValueError(f"window: expected contiguous (S, k, *F) matching current (B, *F); got "
                         f"{tuple(window.shape)} and {tuple(current.shape)}")
    if weight.numel() != k:
        raise ValueError(f"weight: expected {k} entries for a window of {k}, got {weight.numel()}")
    F = window[0, 0].numel()
    cur = current.to(window.dtype).contiguous()
    s = torch.empty_like(cur)
    w = weight.detach().to(window.dtype).contiguous()
    b = bias.detach().to(window.dtype).reshape(1).contiguous()
    block_f = min(triton.next_power_of_2(F), 256)
    block_b = max(1, 1024 // block_f)
    grid = (triton.cdiv(B, block_b), triton.cdiv(F, block_f))
    _sliding_slots_kernel[grid](window, t, idx, cur, w, b, s, B, F, K=k, BLOCK_B=block_b, BLOCK_F=block_f,
                                num_warps=4)
    return s
