"""Run a model's ONNX files with onnxruntime, reading everything it needs from their metadata.

``OnnxModel(folder)`` is what a client in any language does: open ``model.onnx`` for whole sequences,
open ``model_step.onnx``, build a zero state from its ``state`` metadata, feed ``x`` and the state,
and keep each ``new_<name>`` output as the next step's ``<name>`` input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exported.onnx_export import PARALLEL_FILE, STEP_FILE


@dataclass(frozen=True)
class StateInput:
    name: str
    output: str
    shape: tuple[int, ...]  # without the batch axis
    dtype: np.dtype


def read_metadata(session: ort.InferenceSession) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def make_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxModel:
    """The parallel and (if present) step ONNX files of one folder, with numpy in and out."""

    def __init__(self, folder: str | os.PathLike, *, threads: int | None = None):
        folder = Path(folder)
        self.parallel_session = make_session(folder / PARALLEL_FILE, threads)
        self.meta = read_metadata(self.parallel_session)
        self.step_session = make_session(folder / STEP_FILE, threads) if (folder / STEP_FILE).is_file() else None
        self.states: list[StateInput] = []
        if self.step_session is not None:
            spec = json.loads(read_metadata(self.step_session)["state"])
            self.states = [StateInput(s["name"], s["output"], tuple(s["shape"][1:]), np.dtype(s["dtype"]))
                           for s in spec]
            self._step_outputs = [o.name for o in self.step_session.get_outputs()]

    @property
    def streams(self) -> bool:
        return self.step_session is not None

    def parallel(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` (T, B, *input_shape) float32 -> spikes (T, B, *out), scores (T, B, C)."""
        spikes, scores = self.parallel_session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return spikes, scores

    def initial_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, *s.shape), dtype=s.dtype) for s in self.states]

    def step(self, x_t: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """One step ``x_t`` (B, *input_shape) -> spikes (B, *out), scores (B, C), new state."""
        if self.step_session is None:
            raise ValueError(f"model '{self.meta.get('model_name')}' has no step form ({STEP_FILE} missing)")
        feed = {"x": np.ascontiguousarray(x_t, dtype=np.float32)}
        feed.update({s.name: v for s, v in zip(self.states, state, strict=True)})
        outs = dict(zip(self._step_outputs, self.step_session.run(None, feed), strict=True))
        return outs["spikes"], outs["scores"], [outs[s.output] for s in self.states]

    def run_steps(self, x_seq: np.ndarray, state: list[np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Step through ``x_seq`` (T, B, *input_shape) one step at a time; stacked spikes and scores."""
        state = self.initial_state(x_seq.shape[1]) if state is None else state
        spikes, scores = [], []
        for x_t in x_seq:
            s, sc, state = self.step(x_t, state)
            spikes.append(s)
            scores.append(sc)
        return np.stack(spikes), np.stack(scores), state
