"""Optional fused GPU kernels for the parallel form (Triton): ``S = Heaviside(W X + b)`` in one pass.

The plain PyTorch path writes ``H`` to memory and reads it back for the threshold; these kernels keep
each tile of ``H`` in registers, so ``X`` is read once and ``S`` written once (the byte floor of the
parallel form). Inference only (no autograd). Used where Triton and a CUDA tensor are present, or
under ``TRITON_INTERPRET=1`` for testing on a CPU.

- ``psn_forward_fused``: any (T, T) weight, one ``tl.dot`` per (T, BLOCK_N) tile (the full PSN, a
  masked PSN with a relaxed mask).
- ``psn_forward_banded``: a band of order k (masked PSN with lam = 1, sliding PSN): ``k`` shifted
  multiply-adds per output, no matrix product; the k shifted reads of a tile hit the cache, so DRAM
  sees each input about once. Exact fp32 arithmetic (only the summation order differs).
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
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        offs_t = tl.arange(0, BLOCK_T)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok = offs_t < T
        w = tl.load(w_ptr + offs_t[:, None] * T + offs_t[None, :], mask=t_ok[:, None] & t_ok[None, :], other=0.0)
        xmask = t_ok[:, None] & (offs_n[None, :] < N)
        x = tl.load(x_ptr + offs_t[:, None] * N + offs_n[None, :], mask=xmask, other=0.0)
        if IEEE:
            h = tl.dot(w, x, input_precision="ieee")
        else:
            h = tl.dot(w, x)
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


def fused_available(x: Tensor) -> bool:
    """True where the fused kernel runs: Triton installed, a CUDA float32 tensor, not disabled by PSN_FUSED=0."""
    return HAVE_TRITON and x.is_cuda and x.dtype == torch.float32 and os.environ.get("PSN_FUSED", "1") != "0"


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the fused PSN kernels need Triton (pip install triton)")


def psn_forward_fused(x_seq: Tensor, weight: Tensor, bias: Tensor, *, ieee: bool = True,
                      block_n: int | None = None, num_warps: int = 4) -> Tensor:
    """Spikes of ``W X + b`` for ``x_seq`` (T, ...) float32; ``weight`` (T, T) effective; bias (T,) or scalar.

    ``ieee=True`` keeps full fp32 products (same spikes as the PyTorch path away from ties);
    ``ieee=False`` lets Triton use TF32 tensor cores (faster, ~1e-3 relative error in ``H``).
    """
    _require_triton()
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
                          BLOCK_T=block_t, BLOCK_N=block_n, IEEE=ieee, num_warps=num_warps)
    return s.reshape(x_seq.shape)


def psn_forward_banded(x_seq: Tensor, band: Tensor, bias: Tensor, *, block_t: int = 16, block_n: int = 256,
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
