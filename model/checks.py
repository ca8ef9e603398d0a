"""Input checks shared by neurons and networks: every bad input gets an error that names it."""

from __future__ import annotations

import torch
from torch import Tensor


class InputError(ValueError):
    """A tensor handed to a model has the wrong shape, dtype or values."""


class HorizonError(InputError):
    """A masked PSN was asked for a step past its fixed horizon T."""


def check_tensor(x: object, name: str, *, min_dim: int = 1, dtype: torch.dtype | None = None,
                 finite: bool = True) -> Tensor:
    """Raise ``InputError`` unless ``x`` is a floating tensor of at least ``min_dim`` dims, all finite."""
    if not isinstance(x, Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise InputError(f"{name}: expected dtype {dtype}, got {x.dtype}")
    if x.dim() < min_dim:
        raise InputError(f"{name}: expected at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    if finite and not bool(torch.isfinite(x).all()):
        raise InputError(f"{name}: contains NaN or Inf")
    return x


def check_trailing_shape(x: Tensor, name: str, lead: str, expected: tuple[int, ...]) -> None:
    """Raise unless ``x.shape`` is ``(lead dims..., *expected)``; ``lead`` names the leading axes."""
    n_lead = len(lead.split(","))
    if x.dim() != n_lead + len(expected) or tuple(x.shape[n_lead:]) != tuple(expected):
        want = "(" + ", ".join([lead, *map(str, expected)]) + ")"
        raise InputError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
