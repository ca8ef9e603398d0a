"""onnxruntime backend (``PSN_BACKEND=onnx``): CPU serving from the model's ONNX files, no PyTorch math.

Streaming runs ``model_step.onnx`` one step at a time over the gathered slot state (numpy arrays,
``(max_slots, ...)`` per state input, preallocated); ``classify`` runs ``model.onnx``.

The files come from the model folder when they are there and were made from its current weights
(their ``weights_sha256`` metadata); otherwise the model is exported once into a cache folder,
``PSN_ONNX_CACHE_DIR`` (default ``~/.cache/psn-stream/onnx``), keyed by name and weights hash.
``PSN_ONNX_THREADS`` sets onnxruntime's intra-op threads (default: its own choice). Both are
``Settings`` fields (read from the environment when no settings are passed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from exported.onnx_export import export_is_current, export_model, weights_sha256
from exported.runtime import OnnxModel
from model.folder import LoadedModel
from service.config import Settings

log = logging.getLogger(__name__)


def onnx_folder(model: LoadedModel, cache_dir: Path | None = None) -> Path:
    """A folder with current ONNX files for ``model``: its own, or a folder under ``cache_dir``
    (default ``~/.cache/psn-stream/onnx``) exported on demand."""
    streams = model.cfg.streams
    sha = weights_sha256(model.path)  # read and hashed once, for both folders
    if export_is_current(model.path, streams, sha):
        return model.path
    cache_dir = cache_dir or Path.home() / ".cache" / "psn-stream" / "onnx"
    cached = cache_dir / f"{model.name}-{sha[:16]}"
    if not export_is_current(cached, streams, sha):  # the cache holds no weights file: compare with the model's
        log.info("exporting model %r to ONNX in %s (no current ONNX files in %s)", model.name, cached, model.path)
        export_model(model, cached)
    return cached


class OnnxBackend:
    """The backend interface of ``service/backends/base.py`` over onnxruntime sessions."""

    dtype = torch.float32  # the ONNX graphs are float32

    def __init__(self, model: LoadedModel, max_slots: int, settings: Settings | None = None):
        self.model = model
        settings = settings or Settings()
        self.folder = onnx_folder(model, settings.onnx_cache_dir)
        self.onnx = OnnxModel(self.folder, threads=settings.onnx_threads)
        self.max_slots = max_slots if self.onnx.streams else 0
        self._state = self.onnx.initial_state(self.max_slots)  # per state input: (max_slots, ...)
        kind = model.cfg.kind
        self._pad_to = model.cfg.T if kind.horizon and not kind.exact_T else None  # model.onnx takes exactly T

    def reset(self, slots: Tensor) -> None:
        self._require_slots()
        idx = slots.numpy()
        for arr in self._state:
            arr[idx] = 0

    def seek(self, slots: Tensor, t: Tensor) -> None:
        self._require_slots()
        idx, tn = slots.numpy(), t.numpy()
        for spec, arr in zip(self.onnx.states, self._state, strict=True):
            arr[idx] = tn.reshape(-1, *([1] * (arr.ndim - 1))) if spec.name.endswith("_t") else 0

    def score_sums(self, slots: Tensor) -> Tensor:
        return torch.from_numpy(self._state[self._sum_index][slots.numpy()])

    def set_score_sums(self, slots: Tensor, sums: Tensor) -> None:
        arr = self._state[self._sum_index]
        arr[slots.numpy()] = sums.numpy().astype(arr.dtype, copy=False)

    @property
    def _sum_index(self) -> int:
        return [s.name for s in self.onnx.states].index("state_score_sum")

    def run(self, x: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        self._require_slots()
        idx = slots.numpy()
        state = [arr[idx] for arr in self._state]  # gathered copies, (B, ...)
        spikes, scores, state = self.onnx.run_steps(x.to(self.dtype).numpy(), state)
        for arr, new in zip(self._state, state, strict=True):
            arr[idx] = new
        return torch.from_numpy(spikes), torch.from_numpy(scores)

    def classify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xn = x.to(self.dtype).numpy()
        T = xn.shape[0]
        if self._pad_to is not None and T < self._pad_to:
            # model.onnx of a masked PSN takes exactly T steps; it is causal, so the outputs for a
            # shorter prefix do not depend on the zero padding after it
            xn = np.concatenate([xn, np.zeros((self._pad_to - T, *xn.shape[1:]), dtype=xn.dtype)])
        spikes, scores = self.onnx.parallel(xn)
        return torch.from_numpy(spikes[:T]), torch.from_numpy(scores[:T])

    def _require_slots(self) -> None:
        if not self.max_slots:
            raise RuntimeError(f"model {self.model.name!r} cannot stream: it has no session slots")
