"""Network configuration: the frozen dataclasses a model folder stores, and input normalisation.

``NetConfig`` describes a network completely (``PSNNet(cfg)`` rebuilds it); ``config.json`` holds it
as a dict (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.kinds import NeuronKind, kind


@dataclass(frozen=True)
class LayerConfig:
    kind: str = "linear"  # "linear" (flattens its input) or "conv" (Conv1d over the features of one step)
    out: int = 64  # output features (linear) or channels (conv)
    kernel_size: int = 3  # conv only: odd kernel, "same" padding
    stride: int = 1  # conv only
    batch_norm: bool = True  # BatchNorm1d over the features/channels before the neuron


@dataclass(frozen=True)
class NetConfig:
    input_shape: tuple[int, ...]  # features of one step: (F,) or (channels, length) for conv layers
    num_classes: int  # readout size
    layers: tuple[LayerConfig, ...] = (LayerConfig(),)  # hidden spiking layers, in order
    neuron: str = "sliding"  # one of NEURONS
    k: int = 8  # order of the masked / sliding PSN
    T: int | None = None  # horizon: required by "masked" and "psn", None for "sliding" / "lif"
    alpha: float = 2.0  # arctan surrogate sharpness
    lif_tau: float = 2.0  # LIF baseline only
    # inputs are normalised as (x - input_mean) / input_std before layer 0: one number each, or one per
    # entry of the last input axis (a tuple of input_shape[-1] numbers: per-feature statistics)
    input_mean: float | tuple[float, ...] = 0.0
    input_std: float | tuple[float, ...] = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "layers", tuple(
            layer if isinstance(layer, LayerConfig) else LayerConfig(**layer) for layer in self.layers))
        kd = kind(self.neuron)
        if kd.horizon and (self.T is None or self.T < 1):
            raise ValueError(f"neuron {self.neuron!r} needs a horizon T >= 1, got T={self.T}")
        if kd.has_k and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if kd.has_k and kd.horizon and self.k > self.T:  # type: ignore[operator]
            raise ValueError(f"{kd.label} needs k <= T, got k={self.k}, T={self.T}")
        for name in ("input_mean", "input_std"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                v = tuple(float(e) for e in v)
                if len(v) != self.input_shape[-1]:
                    raise ValueError(f"{name}: {len(v)} values for a last input axis of {self.input_shape[-1]}")
            else:
                v = float(v)
            object.__setattr__(self, name, v)
        if not all(math.isfinite(v) for v in _as_tuple(self.input_mean)):  # NaN would make every score NaN
            raise ValueError(f"input_mean must be finite, got {self.input_mean}")
        if not all(0 < v < math.inf for v in _as_tuple(self.input_std)):  # inf would make every input 0
            raise ValueError(f"input_std must be > 0 and finite, got {self.input_std}")
        if not self.layers:
            raise ValueError("layers: at least one spiking layer is needed")
        if self.num_classes < 1 or not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"bad input_shape {self.input_shape} or num_classes {self.num_classes}")
        for i, layer in enumerate(self.layers):
            if layer.kind not in ("linear", "conv"):
                raise ValueError(f"layers[{i}].kind: expected 'linear' or 'conv', got {layer.kind!r}")
            if layer.kind == "conv" and layer.kernel_size % 2 == 0:
                raise ValueError(f"layers[{i}].kernel_size must be odd, got {layer.kernel_size}")
            for size in ("out", "kernel_size", "stride"):
                if getattr(layer, size) < 1:
                    raise ValueError(f"layers[{i}].{size} must be >= 1, got {getattr(layer, size)}")

    @property
    def kind(self) -> NeuronKind:
        """What this network's neuron kind can do (``model.kinds``)."""
        return kind(self.neuron)

    @property
    def streams(self) -> bool:
        return self.kind.streams

    @property
    def horizon(self) -> int | None:
        """The most steps a sequence may have (masked PSN, PSN), else None."""
        return self.T if self.kind.horizon else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        d = dict(d)
        d["layers"] = tuple(LayerConfig(**layer) for layer in d.get("layers", ()))
        for name in ("input_mean", "input_std"):
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return cls(**d)


def _as_tuple(v: float | tuple[float, ...]) -> tuple[float, ...]:
    return v if isinstance(v, tuple) else (v,)


def normalise(cfg: NetConfig, x: Tensor) -> Tensor:
    """``(x - input_mean) / input_std`` for ``x`` (..., *input_shape): the one place inputs are normalised
    (the network, its ONNX graphs and the parity checks all call it)."""
    mean, std = cfg.input_mean, cfg.input_std
    if mean == 0.0 and std == 1.0:
        return x
    if isinstance(mean, tuple):
        mean = torch.tensor(mean, dtype=x.dtype, device=x.device)  # (F,) broadcast over the last axis
    if isinstance(std, tuple):
        std = torch.tensor(std, dtype=x.dtype, device=x.device)
    return (x - mean) / std


__all__ = ["LayerConfig", "NetConfig", "normalise"]
