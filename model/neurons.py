"""The PSN family as ``nn.Module``s: parameters here, math in ``model.functional``.

``PSN(T)``, ``MaskedPSN(k, T)``, ``SlidingPSN(k)`` (and ``LIF``, the paper's serial baseline).
Parallel form: ``forward(x_seq)`` over ``(T, batch, ...)``. Step form (masked, sliding, LIF):
``initial_state(batch, feature_shape)``, ``step(x_t, state)``, ``chunk(x_chunk, state)``, all pure.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model import functional as F
from model.checks import HorizonError, InputError, check_tensor
from model.functional import NeuronState
from model.kernels import fused_available, psn_forward_banded, psn_forward_fused

BANDED_MAX_K = 16  # above this order the fused matrix product beats k shifted multiply-adds


class _MatrixNeuron(nn.Module):
    """Parallel form ``H = effective_weight(T) @ X + b`` shared by the PSN, masked and sliding PSN."""

    alpha: float
    validate: bool
    bias: Tensor

    def effective_weight(self, T: int) -> Tensor:
        raise TypeError(f"{type(self).__name__} must define effective_weight(T)")

    def band_weight(self, T: int) -> Tensor | None:
        """The nonzero band of ``effective_weight(T)``: (k,) shared or (T, k) per step; None if not banded."""
        return None

    def membrane(self, x_seq: Tensor) -> Tensor:
        """``H`` for ``x_seq`` (T, ...), same shape."""
        return self._parallel(x_seq)[1]

    def forward(self, x_seq: Tensor) -> Tensor:
        """Spikes ``S = Heaviside(W X + b)`` for ``x_seq`` (T, ...), same shape.

        Without autograd on a CUDA float32 tensor (and Triton installed), one fused kernel does it
        (the banded one for a masked PSN with lam = 1 or a sliding PSN of order <= ``BANDED_MAX_K``).
        """
        if not torch.is_grad_enabled() and fused_available(x_seq):
            return self._forward_fused(x_seq)
        weight, bias = self._checked_params(x_seq)
        return F.matrix_forward(x_seq, weight, bias, self.alpha)[0]

    def _forward_fused(self, x_seq: Tensor) -> Tensor:
        # Few host-side tensor ops here: at a kernel's size (~0.2 ms) each launch shows.
        if self.validate:
            check_tensor(x_seq, "x_seq")
        T = x_seq.shape[0]
        bias = self.bias[:T] if self.bias.dim() else self.bias
        band = self.band_weight(T)
        if band is not None and band.shape[-1] <= BANDED_MAX_K:
            return psn_forward_banded(x_seq, band, bias)
        return psn_forward_fused(x_seq, self.effective_weight(T), bias)

    def _parallel(self, x_seq: Tensor) -> tuple[Tensor, Tensor]:
        weight, bias = self._checked_params(x_seq)
        return F.matrix_forward(x_seq, weight, bias, self.alpha)

    def _checked_params(self, x_seq: Tensor) -> tuple[Tensor, Tensor]:
        """Check ``x_seq`` (when validating); the (T, T) weight and the bias for its T steps."""
        if self.validate:
            check_tensor(x_seq, "x_seq")
        T = x_seq.shape[0]
        return self.effective_weight(T), self.bias[:T] if self.bias.dim() else self.bias


class PSN(_MatrixNeuron):
    """Parallel spiking neuron: ``H = W X + b``, ``S = Heaviside(H)``; ``W`` is (T, T). Parallel only."""

    streams = False

    def __init__(self, T: int, alpha: float = 2.0, validate: bool = True):
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.T, self.alpha, self.validate = T, alpha, validate
        bound = 1.0 / math.sqrt(T)
        self.weight = nn.Parameter(torch.empty(T, T).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.full((T,), -1.0))  # threshold starts at 1

    def effective_weight(self, T: int) -> Tensor:
        if T != self.T:
            raise InputError(f"x_seq: PSN needs exactly T={self.T} steps, got {T}")
        return self.weight

    def extra_repr(self) -> str:
        return f"T={self.T}, alpha={self.alpha}"


class _StreamingNeuron(nn.Module):
    """Shared step/chunk plumbing: subclasses provide ``_chunk`` and ``_step`` over checked inputs."""

    streams = True
    k: int

    def initial_state(self, batch: int, feature_shape: tuple[int, ...] = (), *, device=None,
                      dtype: torch.dtype | None = None) -> NeuronState:
        p = next(self.parameters())
        return F.initial_state(self.k, batch, tuple(feature_shape), device=device or p.device,
                               dtype=dtype or p.dtype)

    def _check_state(self, state: NeuronState, batch_shape: tuple[int, ...]) -> None:
        if not isinstance(state, NeuronState):
            raise InputError(f"state: expected a NeuronState, got {type(state).__name__}")
        want = (batch_shape[0], self.k, *batch_shape[1:])
        if tuple(state.window.shape) != want:
            raise InputError(f"state.window: expected shape {want} for this input, got {tuple(state.window.shape)}")

    def step(self, x_t: Tensor, state: NeuronState) -> tuple[Tensor, NeuronState]:
        """One step ``x_t`` (B, *features) -> ``(spikes (B, *features), new_state)``."""
        if self.validate:
            check_tensor(x_t, "x_t")
            self._check_state(state, tuple(x_t.shape))
        self._check_horizon(state, 1)
        s, _, new = self._step(x_t, state)
        return s, new

    def chunk(self, x_chunk: Tensor, state: NeuronState) -> tuple[Tensor, NeuronState]:
        """L new steps ``x_chunk`` (L, B, *features) in parallel form over the stored window."""
        if self.validate:
            check_tensor(x_chunk, "x_chunk", min_dim=2)
            self._check_state(state, tuple(x_chunk.shape[1:]))
        self._check_horizon(state, x_chunk.shape[0])
        s, _, new = self._chunk(x_chunk, state)
        return s, new

    def _check_horizon(self, state: NeuronState, L: int) -> None:
        pass


class MaskedPSN(_MatrixNeuron, _StreamingNeuron):
    """Masked PSN of order k: ``W`` (T, T) masked to the band ``t-k < i <= t``.

    ``lam`` relaxes the mask during training (``lam*M_k + (1-lam)*ones``); 1.0 = fully masked,
    the only value that may stream.
    """

    def __init__(self, k: int, T: int, alpha: float = 2.0, validate: bool = True):
        super().__init__()
        if not 1 <= k <= T:
            raise ValueError(f"masked PSN needs 1 <= k <= T, got k={k}, T={T}")
        self.k, self.T, self.alpha, self.validate = k, T, alpha, validate
        self.lam = 1.0
        bound = 1.0 / math.sqrt(k)
        self.weight = nn.Parameter(torch.empty(T, T).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.full((T,), -1.0))  # threshold starts at 1
        self.register_buffer("mask", F.band_mask(k, T), persistent=False)

    def _check_T(self, T: int) -> None:
        if T > self.T:
            raise HorizonError(f"x_seq: masked PSN has a fixed horizon of T={self.T} steps, got {T}")

    def effective_weight(self, T: int) -> Tensor:
        """The masked (T', T') weight for the first ``T' <= T`` steps (causal, so a prefix is exact)."""
        self._check_T(T)
        if self.lam >= 1.0:
            m = self.mask
        else:
            m = self.lam * self.mask + (1.0 - self.lam)
        return (self.weight * m.to(self.weight.dtype))[:T, :T]

    def band_weight(self, T: int) -> Tensor | None:
        """(T, k) band of the masked weight (lam = 1 only). Without autograd it is cached until the
        weight changes (any in-place update bumps the tensor's version), so inference pays no gather."""
        if self.lam < 1.0:
            return None
        self._check_T(T)
        w = self.weight
        key = (T, w.device, w.data_ptr(), w._version)
        cached = self.__dict__.get("_band_cache")
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        t0 = torch.zeros(1, dtype=torch.long, device=w.device)
        band = F.masked_band_weights(w, t0, self.k, T)[0]  # (T, k)
        if not torch.is_grad_enabled():
            self.__dict__["_band_cache"] = (key, band)
        return band

    def _check_horizon(self, state: NeuronState, L: int) -> None:
        if self.lam < 1.0:
            raise InputError(f"masked PSN cannot stream with lam={self.lam} < 1 (its relaxed mask reads "
                             "future inputs); set lam = 1.0 after training")
        last = int(state.t.max()) + L if state.t.numel() else 0
        if last > self.T:
            raise HorizonError(f"masked PSN has a fixed horizon of T={self.T} steps; "
                               f"step {last} (1-based) is past it")

    def _step(self, x_t: Tensor, state: NeuronState):
        return F.masked_step(x_t, state, self.weight, self.bias, self.k, self.alpha)

    def _chunk(self, x_chunk: Tensor, state: NeuronState):
        return F.masked_chunk(x_chunk, state, self.weight, self.bias, self.k, self.alpha)

    def extra_repr(self) -> str:
        return f"k={self.k}, T={self.T}, alpha={self.alpha}, lam={self.lam}"


class SlidingPSN(_MatrixNeuron, _StreamingNeuron):
    """Sliding PSN of order k: ``H[t] = sum_i w_i X[t-k+1+i] + b``; ``weight[k-1]`` multiplies the current input."""

    def __init__(self, k: int, alpha: float = 2.0, exp_init: bool = True, validate: bool = True):
        super().__init__()
        if k < 1:
            raise ValueError(f"sliding PSN needs k >= 1, got {k}")
        self.k, self.alpha, self.validate = k, alpha, validate
        if exp_init:  # the paper's default: w_i = 2^(i - k + 1)
            w = torch.pow(2.0, torch.arange(k, dtype=torch.float32) - (k - 1))
        else:
            w = torch.empty(k).uniform_(-1.0 / math.sqrt(k), 1.0 / math.sqrt(k))
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.tensor(-1.0))  # threshold starts at 1

    def effective_weight(self, T: int) -> Tensor:
        return F.sliding_matrix(self.weight, T)

    def band_weight(self, T: int) -> Tensor | None:
        return self.weight

    def _step(self, x_t: Tensor, state: NeuronState):
        return F.sliding_step(x_t, state, self.weight, self.bias, self.alpha)

    def _chunk(self, x_chunk: Tensor, state: NeuronState):
        return F.sliding_chunk(x_chunk, state, self.weight, self.bias, self.alpha)

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}"


class LIF(_StreamingNeuron):
    """Leaky integrate-and-fire with hard reset, run as a loop over time (the paper's baseline).

    Its streaming state reuses ``NeuronState`` with a window of one slot that holds the membrane ``v``.
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 2.0, validate: bool = True):
        super().__init__()
        self.k, self.tau, self.v_threshold, self.alpha, self.validate = 1, tau, v_threshold, alpha, validate
        self.register_buffer("_anchor", torch.zeros(()))  # gives initial_state a dtype/device

    def forward(self, x_seq: Tensor) -> Tensor:
        if self.validate:
            check_tensor(x_seq, "x_seq")
        return F.lif_forward(x_seq, self.tau, self.v_threshold, self.alpha)[0]

    def initial_state(self, batch: int, feature_shape: tuple[int, ...] = (), *, device=None,
                      dtype: torch.dtype | None = None) -> NeuronState:
        return F.initial_state(1, batch, tuple(feature_shape), device=device or self._anchor.device,
                               dtype=dtype or torch.get_default_dtype())

    def _step(self, x_t: Tensor, state: NeuronState):
        s, v = F.lif_step(x_t, state.window[:, 0], self.tau, self.v_threshold, self.alpha)
        return s, v, NeuronState(window=v.unsqueeze(1), t=state.t + 1)

    def _chunk(self, x_chunk: Tensor, state: NeuronState):
        s, v = F.lif_forward(x_chunk, self.tau, self.v_threshold, self.alpha, v0=state.window[:, 0])
        return s, None, NeuronState(window=v.unsqueeze(1), t=state.t + x_chunk.shape[0])

    def extra_repr(self) -> str:
        return f"tau={self.tau}, v_threshold={self.v_threshold}, alpha={self.alpha}"


def mask_schedule(progress: float, reach: float = 0.125) -> float:
    """lam for the masked PSN's mask relaxation at training ``progress`` in [0, 1].

    Rises linearly from 0 to 1, reaching 1 at ``reach`` of training (the paper's 1/8 by default).
    """
    if not 0.0 < reach <= 1.0:
        raise ValueError(f"reach must be in (0, 1], got {reach}")
    return float(min(1.0, max(0.0, progress / reach)))
