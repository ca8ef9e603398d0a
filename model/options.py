"""The training command's options: every one is checked before any training (``psn train -h``).

``parse_args`` also reads a ``--data`` file (``model.datafile``), so a bad file stops the command with
a usage error, like a bad option, before any step is taken.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from model.data import DATASETS, DataUnavailable, check_available
from model.datafile import DataFileError, load_data_file
from model.folder import CONFIG_FILE
from model.kinds import KINDS, NEURONS, kind
from model.network import LayerConfig
from model.report import compare_metrics

DATASET_STEPS = {"mnist1d": 40, "smnist": 28, "digits": 8}  # T of each data set, known before loading it
MAX_THREADS = 1024  # torch.set_num_threads: far past any machine; 16,384 crashed torch (threads it could not start)

# Architecture presets: the hidden spiking layers (the readout is added by PSNNet).
PRESETS: dict[str, tuple[LayerConfig, ...]] = {
    "tiny": (LayerConfig("linear", 32),),
    "mnist1d": tuple(LayerConfig("linear", 256) for _ in range(4)),  # receptive field 4(k-1)+1 steps
    # a conv over the 28 pixels of a row (seen as 1 channel), then three linear layers
    "smnist": (LayerConfig("conv", 16, kernel_size=5, stride=2), *(LayerConfig("linear", 256) for _ in range(3))),
}



def parse_layers(spec: str) -> tuple[LayerConfig, ...]:
    """'L256,C16k5s2' -> layer configs (every layer batch-normalised)."""
    layers = []
    for item in spec.split(","):
        m = re.fullmatch(r"L(\d+)|C(\d+)k(\d+)s(\d+)", item.strip())
        if m is None:
            raise argparse.ArgumentTypeError(f"bad layer {item!r}: expected L<out> or C<channels>k<kernel>s<stride>")
        if any(int(g) < 1 for g in m.groups() if g is not None):
            raise argparse.ArgumentTypeError(f"bad layer {item!r}: sizes, kernel and stride must be >= 1")
        if m.group(1):
            layers.append(LayerConfig("linear", int(m.group(1))))
        else:
            layers.append(LayerConfig("conv", int(m.group(2)), kernel_size=int(m.group(3)), stride=int(m.group(4))))
    return tuple(layers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psn train", description="Train a PSN-family network and write a model folder.")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="built-in data set (default: mnist1d)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your own data instead: .npz (x, y, optional lengths, x_test, y_test, class_names), "
                        ".csv (sequence, step, features..., label), UEA/UCR .ts, or sktime:<Name> "
                        "(a .ts data set shipped in the sktime wheel); see docs/training.md")
    p.add_argument("--test-data", default=None, metavar="PATH", help="with --data: the test split, same format")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="with --data and no test split in it: hold out this fraction (fixed seed; default 0.2)")
    p.add_argument("--neuron", default="sliding", choices=NEURONS, help="neuron kind; lif is the serial baseline")
    p.add_argument("-k", "--k", type=int, default=8, help="order of the masked / sliding PSN")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="architecture (default: the data set's)")
    p.add_argument("--layers", default=None, type=parse_layers, metavar="SPEC",
                   help="custom hidden layers instead of a preset, e.g. 'L256,L256' or 'C16k5s2,L128' "
                        "(L<out>: linear; C<channels>k<kernel>s<stride>: conv over the features of a step)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--shift", type=int, default=0, help="augment: shift each training sample by up to N steps")
    p.add_argument("--noise", type=float, default=0.0, help="augment: add Gaussian noise of this std (raw units)")
    p.add_argument("--alpha", type=float, default=2.0, help="arctan surrogate sharpness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test samples")
    p.add_argument("--out", default=None, help="model folder (default: exported/<dataset>-<neuron>)")
    p.add_argument("--compare", nargs="*", default=[], help="model folders whose metrics go in the card's table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every option; a bad one exits with a clear message before any work."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.data is not None and a.dataset is not None:
        parser.error("give --dataset or --data, not both")
    if a.data is None and a.test_data is not None:
        parser.error("--test-data needs --data")
    if a.test_fraction is not None and (a.data is None or a.test_data is not None):  # it would do nothing
        parser.error("--test-fraction holds out part of --data; " + ("a built-in data set has its own test split"
                     if a.data is None else "--test-data is the test split here: give one or the other"))
    a.test_fraction = 0.2 if a.test_fraction is None else a.test_fraction
    a.loaded = None
    if a.data is not None:
        try:
            a.loaded = load_data_file(a.data, test_path=a.test_data, test_fraction=a.test_fraction)
        except (DataFileError, DataUnavailable) as e:
            parser.error(f"--data: {e}")
        a.dataset = a.loaded.name
        T = a.loaded.T
        if not kind(a.neuron).causal and a.loaded.variable_length:
            parser.error(f"--neuron {a.neuron} sees the whole sequence at once, so padding would change its "
                         f"answers; variable-length data needs a causal neuron: "
                         f"{', '.join(n for n, kd in KINDS.items() if kd.causal)}")
    else:
        a.dataset = a.dataset or "mnist1d"
        T = DATASET_STEPS[a.dataset]
    if a.k < 1:
        parser.error(f"-k must be >= 1, got {a.k}")
    if kind(a.neuron).has_k and kind(a.neuron).horizon and a.k > T:
        parser.error(f"{kind(a.neuron).label} needs k <= T; data set {a.dataset!r} has T={T} steps, got -k {a.k}")
    for name in ("epochs", "batch_size", "threads"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.threads > MAX_THREADS:  # torch segfaults past what the OS lets it start (16,384 did here)
        parser.error(f"--threads must be at most {MAX_THREADS}, got {a.threads}")
    for name, low in (("lr", "> 0"), ("alpha", "> 0"), ("weight_decay", ">= 0"), ("noise", ">= 0")):
        v = getattr(a, name)  # inf passed a plain 'v > 0': NaN weights, written with exit status 0
        if not (math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0)):
            parser.error(f"--{name.replace('_', '-')} must be {low} and finite, got {v}")
    if a.shift < 0:
        parser.error(f"--shift must be >= 0 (steps), got {a.shift}")
    for name in ("train_limit", "test_limit"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.loaded is None:
        try:
            check_available(a.dataset)
        except DataUnavailable as e:
            parser.error(str(e))
    try:
        a.device = resolve_device(a.device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device: {e}")
    a.preset = a.preset or (a.dataset if a.dataset in PRESETS else "tiny")
    if a.layers is None:
        a.layers = PRESETS[a.preset]
    else:
        a.preset = "custom"
    kinds = [lc.kind for lc in a.layers]
    if "conv" in kinds and "linear" in kinds and kinds.index("linear") < len(kinds) - kinds[::-1].index("conv"):
        parser.error("--layers: conv layers must all come before the linear layers")
    for folder in a.compare:
        try:
            compare_metrics(folder)
        except ValueError as e:
            parser.error(f"--compare: {e}")
    if a.out is not None and not a.out.strip():
        parser.error("--out is empty: name the model folder to write")
    a.out = a.out or f"exported/{a.dataset}-{a.neuron}"
    if Path(a.out).name in ("", ".", ".."):  # '.', '..', '/': the folder's own name is needed to replace it
        a.out = str(Path(a.out).resolve())
    problem = out_problem(Path(a.out))
    if problem:
        parser.error(f"--out {a.out}: {problem}")
    return a


def out_problem(path: Path) -> str | None:
    """Why the model folder cannot be written at ``path`` (None: it can). The folder is replaced as a whole
    at the end of training, so what is there must be a model folder (or an empty one), and the nearest
    existing folder above it writable (a temporary folder is made and removed there to find out)."""
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            return "exists and is not a folder"
        if any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
            return (f"is a folder with files in it but no {CONFIG_FILE}, not a model folder: training replaces "
                    "the whole folder; name a new folder or a model folder")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"{above} is not a folder"
    try:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=above):
            pass
    except OSError as e:
        return f"cannot write in {above} ({e.strerror or e})"
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type not in ("cpu", "cuda"):  # meta, xpu, mps, ...: training stopped inside torch with a traceback
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but is not available here")
    return dev


__all__ = ["PRESETS", "DATASET_STEPS", "build_parser", "parse_args", "parse_layers", "resolve_device"]
