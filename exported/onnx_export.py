"""Write a model's ONNX files: ``model.onnx`` (parallel form) and ``model_step.onnx`` (step form).

Uses the TorchScript-based exporter of ``torch.onnx`` (``dynamo=False``): it exports these graphs in a
fraction of a second, keeps T dynamic for sliding models (the Toeplitz matrix is built from T by a
gather on a lag index) and turns the LIF baseline's time loop into an ONNX ``Loop``.

Every file carries what a consumer needs as ONNX ``metadata_props`` (string values, lists and shapes
as JSON): see ``metadata`` and docs/onnx.md.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from google.protobuf.message import DecodeError

from exported.graphs import ParallelGraph, StepGraph, state_spec
from model.folder import WEIGHTS_FILE, LoadedModel

EXPORT_VERSION = 1  # bump when the graph interface or the metadata keys change
DEFAULT_OPSET = 18
OPSETS = range(13, 24)  # what the TorchScript exporter and onnxruntime both handle for these graphs
PARALLEL_FILE, STEP_FILE = "model.onnx", "model_step.onnx"


class ExportError(ValueError):
    """A model cannot be exported as asked (bad opset, unknown neuron ...)."""


@dataclass
class ExportResult:
    parallel: Path
    step: Path | None  # None: the model cannot stream (plain PSN)
    notes: list[str] = field(default_factory=list)


def check_opset(opset: int) -> int:
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported: use one of {OPSETS.start}..{OPSETS.stop - 1} "
                          f"(default {DEFAULT_OPSET})")
    return opset


def dynamic_T(model: LoadedModel) -> bool:
    """Sliding and LIF models take any number of steps; masked and PSN models exactly their T."""
    return model.cfg.kind.dynamic_T


def example_T(model: LoadedModel) -> int:
    """The model's horizon, else the length of its training sequences (metrics.json), else 8."""
    if model.cfg.T is not None:
        return model.cfg.T
    return int(model.metrics.get("T") or 8)


def weights_sha256(folder: str | os.PathLike) -> str:
    """Hash of the folder's weights file: ONNX files record it, so a stale export can be detected."""
    path = Path(folder) / WEIGHTS_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def export_is_current(folder: str | os.PathLike, streams: bool, sha256: str | None = None) -> bool:
    """Whether ``folder`` holds the ONNX files its model needs, made from its current weights (``sha256``:
    the weights' hash, for files exported away from their weights, e.g. into the serving cache)."""
    folder = Path(folder)
    files = [PARALLEL_FILE] + ([STEP_FILE] if streams else [])
    want = weights_sha256(folder) if sha256 is None else sha256
    for name in files:
        if not (folder / name).is_file():
            return False
        try:
            proto = onnx.load(str(folder / name), load_external_data=False)
        except (OSError, DecodeError):  # unreadable, truncated, a Git LFS pointer: not a usable export
            return False
        meta = {p.key: p.value for p in proto.metadata_props}
        if meta.get("weights_sha256") != want or meta.get("export_version") != str(EXPORT_VERSION):
            return False
    return True


def metadata(model: LoadedModel, form: str, opset: int) -> dict[str, str]:
    """The metadata_props of one file (``form``: "parallel" or "step")."""
    cfg = model.cfg
    meta = {
        "model_name": model.name,
        "form": form,
        "neuron": cfg.neuron,
        "k": str(cfg.k),
        "T": "" if cfg.T is None else str(cfg.T),
        "dynamic_T": str(dynamic_T(model)).lower(),
        "input_shape": json.dumps(list(cfg.input_shape)),
        "num_classes": str(cfg.num_classes),
        "class_names": json.dumps(model.class_names),
        "input_mean": _stat(cfg.input_mean),
        "input_std": _stat(cfg.input_std),
        "input_normalisation": "inside the graph: feed raw inputs; it computes (x - input_mean) / input_std"
                               + (" (JSON lists: one value per entry of the last input axis)"
                                  if isinstance(cfg.input_mean, tuple) else ""),
        "dataset": str(model.config.get("dataset", "")),
        "weights_sha256": weights_sha256(model.path),
        "opset": str(opset),
        "export_version": str(EXPORT_VERSION),
        "torch_version": torch.__version__,
    }
    if form == "parallel":
        time = "T" if dynamic_T(model) else cfg.T
        meta["inputs"] = json.dumps({"x": [time, "batch", *cfg.input_shape]})
        meta["outputs"] = json.dumps({"spikes": [time, "batch", *model.net.out_shape],
                                      "scores": [time, "batch", cfg.num_classes]})
    else:
        states = [{"name": s.name, "output": f"new_{s.name}", "shape": ["batch", *s.shape], "dtype": s.dtype}
                  for s in state_spec(model.net)]
        meta["state"] = json.dumps(states)
        meta["inputs"] = json.dumps({"x": ["batch", *cfg.input_shape]})
        meta["outputs"] = json.dumps({"spikes": ["batch", *model.net.out_shape], "scores": ["batch", cfg.num_classes]})
        if cfg.kind.horizon:
            meta["horizon"] = f"state_t must stay below T={cfg.T}: a masked PSN has weights for steps 0..T-1 only"
    return meta


def _stat(v: float | tuple[float, ...]) -> str:
    """A normalisation statistic as metadata: a float's repr, or a JSON list of per-feature values."""
    return json.dumps(list(v)) if isinstance(v, tuple) else repr(float(v))


def as_float32(model: LoadedModel) -> LoadedModel:
    """``model`` with a float32 CPU eval copy of its network (the ONNX graphs are float32)."""
    p = model.net.readout.weight
    if p.dtype == torch.float32 and p.device.type == "cpu" and not model.net.training:
        return model
    net = copy.deepcopy(model.net).to(device="cpu", dtype=torch.float32).eval()
    return dataclasses.replace(model, net=net)


def export_model(model: LoadedModel, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Write ``model.onnx`` (and ``model_step.onnx`` if the model streams) into ``out_dir``; checker-verified."""
    check_opset(opset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = as_float32(model)
    net = model.net
    result = ExportResult(parallel=out_dir / PARALLEL_FILE, step=None)
    _write(_export_parallel(model, opset), result.parallel)
    stale_step = out_dir / STEP_FILE
    if model.cfg.streams:
        result.step = stale_step
        _write(_export_step(model, opset), result.step)
    else:
        stale_step.unlink(missing_ok=True)
        result.notes.append(f"{model.name}: neuron '{net.cfg.neuron}' cannot stream (it needs the whole sequence "
                            f"at once); wrote {PARALLEL_FILE} only, no {STEP_FILE}")
    return result


def _export_parallel(model: LoadedModel, opset: int) -> onnx.ModelProto:
    cfg = model.cfg
    x = torch.zeros(example_T(model), 2, *cfg.input_shape)
    axes = {0: "T", 1: "batch"} if dynamic_T(model) else {1: "batch"}
    dyn = {"x": axes, "spikes": axes, "scores": axes}
    proto = _trace(ParallelGraph(model.net), (x,), ["x"], ["spikes", "scores"], dyn, opset)
    return _finish(proto, metadata(model, "parallel", opset))


def _export_step(model: LoadedModel, opset: int) -> onnx.ModelProto:
    specs = state_spec(model.net)
    B = 2
    x = torch.zeros(B, *model.cfg.input_shape)
    state = [torch.zeros(B, *s.shape, dtype=torch.long if s.dtype == "int64" else torch.float32) for s in specs]
    names = [s.name for s in specs]
    inputs, outputs = ["x", *names], ["spikes", "scores", *(f"new_{n}" for n in names)]
    dyn = {n: {0: "batch"} for n in inputs + outputs}
    proto = _trace(StepGraph(model.net), (x, *state), inputs, outputs, dyn, opset)
    return _finish(proto, metadata(model, "step", opset))


def _trace(graph: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str],
           dyn: dict[str, dict[int, str]], opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that shape reads become constants (intended: only feature sizes are read that
        # way) and that this exporter is deprecated in favour of the dynamo one.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, buf, dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=dyn, opset_version=opset, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _finish(proto: onnx.ModelProto, meta: dict[str, str]) -> onnx.ModelProto:
    proto.producer_name = "psn-stream"
    proto.doc_string = f"psn-stream {meta['form']} form of '{meta['model_name']}' ({meta['neuron']} PSN network)"
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _write(proto: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
