"""One model in the engine core: its backend, and a backend call over a batch with outputs as arrays.

Inputs arrive as raw little-endian floats (the wire dtype), outputs leave as bit-packed spikes and
scores in the wire dtype (``service/ipc.py``): the engine core never builds a Python number per
step. The front ends turn these arrays into JSON or binary frames (``service/frontend/codec.py``).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from model.folder import WEIGHTS_FILE
from service.backends.base import Backend
from service.core.journal import LogSpec, fingerprint
from service.errors import InvalidInput


class ModelRunner:
    def __init__(self, backend: Backend):
        self.backend = backend
        model = backend.model
        self.name, self.cfg = model.name, model.cfg
        self.wire = np.dtype(np.float64 if backend.dtype == torch.float64 else np.float32)
        self.input_shape = tuple(self.cfg.input_shape)
        self.input_size = math.prod(self.input_shape)
        self.output_shape = tuple(model.net.out_shape)
        self.n_out = math.prod(self.output_shape)
        self.spike_bytes = (self.n_out + 7) // 8
        self.classes = self.cfg.num_classes
        kind = self.cfg.kind
        self.horizon = self.cfg.T if kind.horizon and kind.streams else None  # steps a session may take
        self.exact_T = self.cfg.T if kind.exact_T else None  # classify needs exactly T steps
        self.max_input = model.net.max_input()  # front ends refuse larger values (PSNNet.max_input says why)

    # Padding rows (session-steps) one backend call's fixed cost is worth: a ragged call (``run_ragged``)
    # replaces several where it adds fewer padding rows than this per call saved. Measured at warm-up
    # (``measure_call_rows``); this until then (a CPU call of a few sessions costs about as much as a few
    # hundred rows of the shipped models: BENCHMARKS.md).
    call_rows = 128.0

    @property
    def streams(self) -> bool:
        return self.cfg.streams and self.backend.max_slots > 0

    @property
    def ragged(self) -> bool:
        """The backend runs sessions of different step counts in one call (``run_ragged``)."""
        return self.streams and bool(getattr(self.backend, "ragged", False))

    def check_payload(self, payload: bytes, L: int) -> None:
        """A payload must hold ``L`` >= 1 steps in the wire dtype (front ends check shapes before this)."""
        if L < 1 or len(payload) != L * self.input_size * self.wire.itemsize:
            raise InvalidInput(f"steps: {len(payload)} bytes for {L} steps of {self.input_size} {self.wire.name}",
                               field="steps")

    def inputs(self, data: bytes, B: int, L: int) -> torch.Tensor:
        """``B`` payloads of ``L`` steps each, joined -> (L, B, *input_shape) in the backend's dtype."""
        x = np.frombuffer(data, dtype=self.wire).reshape(B, L, *self.input_shape)
        # time-major and contiguous: the backend's chunk runs 1.5x slower on the strided view (measured)
        return torch.from_numpy(x.swapaxes(0, 1).copy()).to(self.backend.dtype)

    def outputs(self, spikes: torch.Tensor, scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Backend outputs (L, B, ...) -> packed spikes (B, L, spike_bytes) uint8, scores (B, L, C) wire."""
        L, B = spikes.shape[:2]
        s8 = spikes.reshape(L, B, self.n_out).to(torch.uint8).numpy().transpose(1, 0, 2)
        packed = np.packbits(s8, axis=-1, bitorder="little")
        sc = scores.to(torch.float64 if self.wire == np.float64 else torch.float32).numpy().transpose(1, 0, 2)
        return packed, np.ascontiguousarray(sc)

    def run(self, slots: list[int], data: bytes, L: int) -> tuple[np.ndarray, np.ndarray]:
        """``L`` new steps for each slot (one backend call; ``data``: the payloads joined in slot order):
        packed spikes (B, L, nb), scores (B, L, C)."""
        spikes, scores = self.backend.run(self.inputs(data, len(slots), L), torch.tensor(slots, dtype=torch.long))
        return self.outputs(spikes, scores)

    def run_ragged(self, slots: list[int], payloads: list[bytes], lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """One backend call for sessions of different step counts (``lengths``, each payload's): packed spikes
        (B, L, nb) and scores (B, L, C) for L = max(lengths), of which row b's first ``lengths[b]`` steps
        are its outputs (the rest is padding's)."""
        L = max(lengths)
        row = self.input_size * self.wire.itemsize
        pad = {n: bytes((L - n) * row) for n in set(lengths)}
        data = b"".join(part for p, n in zip(payloads, lengths, strict=True) for part in (p, pad[n]))
        idx, steps = torch.tensor(slots, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
        spikes, scores = self.backend.run_ragged(self.inputs(data, len(slots), L), idx, steps)
        return self.outputs(spikes, scores)

    def measure_call_rows(self, repeat: int = 3) -> None:
        """``call_rows`` from timed calls on slots 0..B-1 (before any session has one; they are reset after):
        one session of two steps, and B sessions of 16 steps; the best of ``repeat`` each. Two steps, not one:
        the calls a ragged call saves are of several steps (a one-step call of a sliding-PSN net on a CPU
        takes a cheaper path, ``PSNNet.step_slots_exact_``, that would understate them)."""
        B = min(16, self.backend.max_slots)
        if not self.ragged or B < 2 or (self.horizon is not None and self.horizon < 16):
            return

        def best(n: int, L: int) -> float:
            data = np.zeros(n * L * self.input_size, self.wire).tobytes()
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                self.run(list(range(n)), data, L)
                times.append(time.perf_counter() - t0)
            return min(times)

        two, many = best(1, 2), best(B, 16)
        per_row = max(many - two, 1e-9) / (B * 16 - 2)
        self.call_rows = min(4096.0, max(8.0, (two - 2 * per_row) / per_row))
        self.reset(list(range(B)))

    def classify(self, payloads: list, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole sequences of ``T`` steps from an empty state, no slots touched."""
        spikes, scores = self.backend.classify(self.inputs(b"".join(payloads), len(payloads), T))
        return self.outputs(spikes, scores)

    def reset(self, slots: list[int]) -> None:
        self.backend.reset(torch.tensor(slots, dtype=torch.long))

    # ----- durable sessions (service/core/journal.py) -------------------------------------------
    @property
    def sums_dtype(self) -> np.dtype:
        """The score sums' dtype in the log: the backend's, but numpy has no bfloat16, so those are kept as their
        raw 16-bit patterns (uint16), bit for bit."""
        if self.backend.dtype == torch.bfloat16:
            return np.dtype(np.uint16)
        return np.dtype(str(self.backend.dtype).removeprefix("torch."))

    def score_sums(self, slots: np.ndarray) -> np.ndarray:
        """(B, C) running readout sums of ``slots``, in ``sums_dtype``."""
        sums = self.backend.score_sums(torch.from_numpy(slots))
        if sums.dtype == torch.bfloat16:
            return sums.view(torch.int16).numpy().view(np.uint16)
        return sums.numpy()

    def rebuild(self, slots: np.ndarray, t0: np.ndarray, payloads: list[bytes], n: int, sums: np.ndarray) -> None:
        """Put recovered sessions back: from zero windows at steps ``t0`` replay their last ``n`` inputs
        (one backend call; outputs dropped), then set their score sums."""
        idx = torch.from_numpy(slots)
        self.backend.seek(idx, torch.from_numpy(t0))
        if n:
            x = self.inputs(b"".join(payloads), len(payloads), n)
            replay = getattr(self.backend, "replay", None)  # optional: a backend's cheaper run without outputs
            if replay is not None:
                replay(x, idx)
            else:
                self.backend.run(x, idx)
        back = torch.from_numpy(sums.view(np.int16)).view(torch.bfloat16) if self.backend.dtype == torch.bfloat16 \
            else torch.from_numpy(sums)
        self.backend.set_score_sums(idx, back)

    def log_spec(self, window: int, backend_name: str) -> LogSpec:
        net = getattr(self.backend.model, "net", None)
        return LogSpec(name=self.name, row=self.input_size * self.wire.itemsize, spike_bytes=self.spike_bytes,
                       classes=self.classes, wire=self.wire, sums=self.sums_dtype,
                       replay=net.replay_steps if net is not None and self.streams else None, window=window,
                       fingerprint=fingerprint(self.backend.model.path / WEIGHTS_FILE,
                                               str(self.backend.dtype).removeprefix("torch."), backend_name))

    def warmup(self) -> None:
        def zeros(n: int) -> bytes:
            return np.zeros(n * self.input_size, self.wire).tobytes()

        T = self.cfg.T if self.cfg.T is not None else 4
        self.classify([zeros(T)], T)
        if self.streams:
            for L in (1, 2, 16):
                if self.horizon is None or L <= self.horizon:
                    self.run([0], zeros(L), L)
            self.reset([0])
            self.measure_call_rows()

    def info(self) -> dict:
        """What a front end needs to validate inputs and encode outputs (plus GET /v1/models)."""
        cfg, model = self.cfg, self.backend.model
        return {"name": self.name, "neuron": cfg.neuron, "streams": self.streams,
                "k": cfg.k if cfg.kind.has_k else None,
                "horizon": cfg.T if cfg.kind.horizon else None,
                "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
                "num_classes": cfg.num_classes, "class_names": model.class_names,
                "dataset": model.config.get("dataset", ""), "metrics": model.metrics, "config": cfg.to_dict(),
                "max_input": self.max_input,
                "wire_dtype": self.wire.str, "model_dtype": str(self.backend.dtype).removeprefix("torch.")}
