"""Export model folders to ONNX and check them against PyTorch with onnxruntime.

Usage:
    python -m exported.export exported/mnist1d-sliding        # one or more folders
    python -m exported.export --all [--root exported]          # every model folder under the root
    options: --opset N (default 18), --samples N (real test samples for the parity check, default 2000),
             --no-parity (write the files only)

For each folder it writes ``model.onnx`` (parallel form), ``model_step.onnx`` (step form; not for
plain PSN models, which cannot stream), and ``onnx_parity.json`` (the parity summary, also printed;
``--no-parity`` removes an earlier one).
Exit status: 0 all exported and in parity, 1 a parity check failed, 2 bad input (nothing written for
that folder).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime

from exported.onnx_export import DEFAULT_OPSET, OPSETS, ExportError, check_opset, export_model
from exported.parity import Samples, check_parity
from exported.runtime import OnnxModel
from model.data import DataUnavailable
from model.datafile import DataFileError
from model.folder import LoadedModel, ModelFolderError, find_model_folders, load_model_folder

PARITY_FILE = "onnx_parity.json"
# The shipped onnx_parity.json files were written with this many (MNIST-1D: its whole 1000-sample test set;
# sequential MNIST: the first 2000), so `--all` with the defaults reproduces them.
DEFAULT_SAMPLES = 2000


@functools.lru_cache(maxsize=4)
def _dataset(data: str, dataset: str, test_data: str | None, test_fraction: float | None):
    from model.datafile import load_source

    return load_source({"data": data, "dataset": dataset, "test_data": test_data, "test_fraction": test_fraction})


def load_test_samples(model: LoadedModel, n: int) -> tuple[Samples | None, str]:
    """The first ``n`` test samples of the model's data (built-in or its ``--data`` file), time-major;
    or None and the reason."""
    if n <= 0:
        return None, "real samples not requested"
    try:
        ds = _dataset(model.config.get("data") or "", str(model.config.get("dataset") or ""),
                      model.config.get("test_data"), model.config.get("test_fraction"))
    except (DataUnavailable, DataFileError, ImportError) as e:
        return None, str(e)
    name = ds.name
    shape = model.cfg.input_shape
    if math.prod(ds.input_shape) != math.prod(shape):
        return None, f"dataset {name!r} has input shape {ds.input_shape}, the model {shape}"
    x = ds.x_test[:n]
    x = x.reshape(*x.shape[:2], *shape)  # e.g. (F,) -> (1, F): the channel axis a conv model was trained with
    x = x.transpose(0, 1).contiguous().numpy().astype(np.float32)  # (T, n, *input_shape)
    lengths = None if ds.lengths_test is None else ds.lengths_test[:n].numpy()
    return Samples(x=x, y=ds.y_test[:n].numpy(), source=f"{name} test set, first {x.shape[1]}", lengths=lengths), ""


def export_folder(folder: str | Path, *, opset: int = DEFAULT_OPSET, samples: int = DEFAULT_SAMPLES,
                  parity: bool = True, out_dir: str | Path | None = None) -> dict:
    """Export one model folder (into ``out_dir``, default the folder itself); returns the summary."""
    model = load_model_folder(folder)
    out = Path(out_dir) if out_dir is not None else model.path
    result = export_model(model, out, opset=opset)
    summary: dict = {"model": model.name, "files": [p.name for p in (result.parallel, result.step) if p],
                     "notes": result.notes, "opset": opset, "onnxruntime": onnxruntime.__version__}
    if parity:
        real, why = load_test_samples(model, samples)
        summary["parity"] = check_parity(model, OnnxModel(out), real)
        if real is None:
            summary["parity"]["real"] = {"skipped": why}
        summary["passed"] = summary["parity"]["passed"]
        (out / PARITY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    else:  # an earlier summary would vouch for files it did not check
        (out / PARITY_FILE).unlink(missing_ok=True)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['model']}: wrote {', '.join(summary['files'])} (opset {summary['opset']})"]
    lines += [f"  note: {n}" for n in summary["notes"]]
    p = summary.get("parity")
    if p is None:
        return "\n".join(lines)

    def row(label: str, c: dict) -> str:
        return (f"  {label:<22} T={c['T']:<4} B={c['batch']:<4} max|dscore|={c['scores_max_abs_diff']:.2e} "
                f"spike flips={c['spike_mismatches']}/{c['spikes_compared']} "
                f"(unexplained {c['unexplained_by_ties']})  {'ok' if c['ok'] else 'FAIL'}")

    lines.append(row("random: onnx vs torch", p["random"]))
    if "step_vs_parallel" in p:
        lines.append(row("random: step vs par.", p["step_vs_parallel"]))
    for c in p.get("dynamic_T", []):
        lines.append(row("dynamic T", c))
    real = p.get("real", {})
    if "skipped" in real:
        lines.append(f"  real samples: skipped ({real['skipped']})")
    elif real:
        for label, c in zip(("real: onnx vs torch", "real: step vs par."), real["checks"], strict=False):
            lines.append(row(label, c))
        accs = ", ".join(f"{k}={v:.4f}" for k, v in real.items() if k.startswith("acc_"))
        lines.append(f"  accuracy on {real['source']}: {accs}  {'ok' if real['accuracy_ok'] else 'FAIL'}")
    lines.append(f"  parity: {'PASSED' if p['passed'] else 'FAILED'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m exported.export", description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="*", help="model folders to export")
    ap.add_argument("--all", action="store_true", help="export every model folder under --root")
    ap.add_argument("--root", default="exported", help="where --all looks (default: exported)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                    help=f"ONNX opset, {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                    help=f"real test samples for the parity check (default {DEFAULT_SAMPLES}; 0: none)")
    ap.add_argument("--no-parity", action="store_true", help="write the files, skip the parity check")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        check_opset(args.opset)
    except ExportError as e:
        return fail(str(e))
    if args.samples < 0:
        return fail(f"--samples must be >= 0 (0: no real samples), got {args.samples}")
    if args.all == bool(args.folders):
        return fail("name model folders or pass --all (not both)")
    folders = [Path(f) for f in args.folders]
    if args.all:
        folders = find_model_folders(args.root)
        if not folders:
            return fail(f"no model folders (with config.json) under {args.root!r}")
    status = 0
    for folder in folders:
        try:
            summary = export_folder(folder, opset=args.opset, samples=args.samples, parity=not args.no_parity)
        except (ModelFolderError, ExportError) as e:
            status = max(status, fail(str(e)))
            continue
        except OSError as e:  # a read-only folder, a directory where a file goes: was a traceback
            status = max(status, fail(f"{folder}: cannot write its files ({e.strerror or e}: {e.filename})"))
            continue
        print(format_summary(summary))
        if not summary.get("passed", True):
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
