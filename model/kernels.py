"""Optional fused GPU kernel for the parallel form (Triton): ``S = Heaviside(W X + b)`` in one pass.

The plain PyTorch path writes ``H`` to memory and reads it back for the threshold; this kernel keeps
each (T, BLOCK_N) tile of ``H`` in registers, so ``X`` is read once and ``S`` written once (the byte
floor of the parallel form). Inference only (no autograd). Used where Triton and a CUDA tensor are
present, or under ``TRITON_INTERPRET=1`` for testing on a CPU.
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


def fused_available(x: Tensor) -> bool:
    """True where the fused kernel runs: Triton installed, a CUDA float32 tensor, not disabled by PSN_FUSED=0."""
    return HAVE_TRITON and x.is_cuda and x.dtype == torch.float32 and os.environ.get("PSN_FUSED", "1") != "0"


def psn_forward_fused(x_seq: Tensor, weight: Tensor, bias: Tensor, *, ieee: bool = True,
                      block_n: int | None = None) -> Tensor:
    """Spikes of ``W X + b`` for ``x_seq`` (T, ...) float32; ``weight`` (T, T) effective; bias (T,) or scalar.

    ``ieee=True`` keeps full fp32 products (same spikes as the PyTorch path away from ties);
    ``ieee=False`` lets Triton use TF32 tensor cores (faster, ~1e-3 relative error in ``H``).
    """
    if not HAVE_TRITON:
        raise RuntimeError("the fused PSN kernel needs Triton (pip install triton)")
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
                          BLOCK_T=block_t, BLOCK_N=block_n, IEEE=ieee)
    return s.reshape(x_seq.shape)
