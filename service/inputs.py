"""Turn JSON step lists into a checked tensor, or an error that names the field and the expected shape."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from service.errors import InvalidInput, TooManySteps


def shape_text(lead: str, shape: tuple[int, ...]) -> str:
    return "(" + ", ".join([lead, *map(str, shape)]) + ")"


def parse_steps(raw: Any, input_shape: tuple[int, ...], dtype: torch.dtype, max_steps: int,
                field: str = "steps") -> Tensor:
    """``raw``: a list of L steps, each a (nested) list of shape ``input_shape`` -> (L, *input_shape)."""
    want = shape_text("L", input_shape)
    if not isinstance(raw, list) or not raw:
        raise InvalidInput(f"{field}: expected a non-empty list of steps, shape {want}", field=field)
    if len(raw) > max_steps:
        raise TooManySteps(f"{field}: {len(raw)} steps in one request, at most {max_steps} allowed", field=field)
    try:
        x = torch.tensor(raw, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise InvalidInput(f"{field}: expected numbers in shape {want} ({e})", field=field) from None
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise InvalidInput(f"{field}: expected shape {want}, got {tuple(x.shape)}", field=field)
    if not bool(torch.isfinite(x).all()):
        raise InvalidInput(f"{field}: contains NaN or Inf; every value must be finite", field=field)
    return x.to(dtype)
