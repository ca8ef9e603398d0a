"""Heaviside spike with the arctan surrogate gradient (arXiv 2304.12760, after Fang et al. 2021).

Forward: ``S = Heaviside(H)`` with ``Heaviside(0) = 1``.
Backward: ``dS/dH ~ g'(H) = alpha / (2 * (1 + (pi/2 * alpha * H)^2))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def arctan_surrogate_grad(h: Tensor, alpha: float) -> Tensor:
    """The derivative of the arctan surrogate ``g(x) = atan(pi/2 * alpha * x) / pi + 1/2``."""
    return alpha / (2.0 * (1.0 + (math.pi / 2.0 * alpha * h) ** 2))


class _ArctanSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h)
        ctx.alpha = alpha
        return (h >= 0).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        return grad_out * arctan_surrogate_grad(h, ctx.alpha), None


def spike(h: Tensor, alpha: float = 2.0) -> Tensor:
    """Heaviside step of the membrane ``h``; the arctan surrogate carries its gradient."""
    if h.requires_grad:
        return _ArctanSpike.apply(h, alpha)
    return (h >= 0).to(h.dtype)
