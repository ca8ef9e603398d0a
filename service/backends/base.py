"""The backend interface: everything the engine needs from a model runtime, and nothing more.

A backend serves one model. It owns the model's weights and the streaming state of ``max_slots``
sessions, allocated once at construction (a session is a row index, a "slot"). The engine decides
which slots run together; the backend only gathers, computes and scatters.

Contract (the engine guarantees the preconditions, the backend need not re-check them):

- Construction: ``cls(model, max_slots, settings)``; ``settings`` is the service's ``Settings`` (a
  backend reads its own options there, e.g. ``onnx_threads``; None: read from the environment).
  ``model`` is a ``LoadedModel`` (``model/folder.py``) loaded
  with the service's device and dtype; a backend may use ``model.net`` (PyTorch) or only
  ``model.path`` / ``model.cfg`` (e.g. to open ``model_step.onnx``). A model whose ``cfg.streams`` is
  False gets ``max_slots = 0`` and only ``classify`` is called.
- ``dtype``: the floating dtype the backend wants its inputs in (the engine builds ``x`` in it).
- Every tensor crossing the interface is a CPU tensor; a device backend copies in and out.
- ``reset(slots)``: ``slots`` (B,) int64, distinct, in ``[0, max_slots)``: set those slots to the
  initial state (zero windows, zero score sums, t = 0). Called before a slot gets a new session.
- ``run(x, slots)``: ``x`` (L, B, *input_shape) finite, ``slots`` (B,) int64 distinct. Row b continues
  the session in ``slots[b]`` with L new steps (rows may be at different step counts; a masked
  model's rows are checked to stay within T). Gathers those slots' state, computes the L steps
  (as one parallel chunk over the stored window, equal to L single steps), scatters the new state
  back. Returns ``spikes`` (L, B, *output_shape) of the last spiking layer (0/1 in ``dtype``) and
  ``scores`` (L, B, num_classes): running mean of the readout over each session's steps so far.
- ``seek(slots, t)``, ``t`` (B,) int64: zero windows and score sums, step counters set to ``t``: the
  start of a replay (a recovered session re-runs its last inputs from there, ``service/core/journal.py``).
- ``score_sums(slots)`` -> (B, num_classes) and ``set_score_sums(slots, sums)``: the running sums of
  the readout (in ``dtype``), logged at each step and put back after a replay.
- ``classify(x)``: ``x`` (T, B, *input_shape): the parallel form from an empty state (no slots
  touched). Returns ``spikes`` (T, B, *output_shape), ``scores`` (T, B, num_classes).
- Threading: the engine calls all methods from one engine thread per device, never concurrently.

To add a runtime, write ``service/backends/<name>.py`` with a class like this and add one line to
``BACKENDS`` in ``service/backends/__init__.py``; ``PSN_BACKEND=<name>`` selects it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from model.folder import LoadedModel
from service.config import Settings


class Backend(Protocol):
    model: LoadedModel
    max_slots: int
    dtype: torch.dtype

    def reset(self, slots: Tensor) -> None: ...

    def run(self, x: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]: ...

    def seek(self, slots: Tensor, t: Tensor) -> None: ...

    def score_sums(self, slots: Tensor) -> Tensor: ...

    def set_score_sums(self, slots: Tensor, sums: Tensor) -> None: ...

    def classify(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


class BackendClass(Protocol):
    def __call__(self, model: LoadedModel, max_slots: int, settings: Settings | None = None) -> Backend: ...
