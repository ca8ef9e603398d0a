"""Your own data for ``psn train --data PATH``: ``.npz``, CSV and UEA/UCR ``.ts`` files, checked before training.

Formats (docs/training.md has examples):
- ``.npz``: ``x`` (N, T, *features) real numbers, ``y`` (N,) integer class indices 0..C-1; optional
  ``lengths`` (N,) valid steps per sequence (1..T; steps past it are padding and may hold anything,
  NaN included), ``x_test`` / ``y_test`` / ``lengths_test`` (the test split), ``class_names`` (C,) distinct names.
- ``.csv``: one row per step, columns ``sequence, step, feature..., label``; a header row is optional.
  The steps of a sequence are 0..L-1 (rows in any order) and its label is the same on each of its rows;
  sequences are taken in the order of their ids (numeric when every id is a number).
- ``.ts``: the UEA/UCR archive format (multivariate, unequal lengths), read by sktime's
  ``load_from_tsfile_to_dataframe``. ``X_TRAIN.ts`` takes its test split from ``X_TEST.ts`` beside it.
- ``sktime:<Name>``: the ``.ts`` files of data set <Name> shipped inside the sktime wheel
  (``sktime/datasets/data/<Name>/``), e.g. ``sktime:JapaneseVowels``; nothing is downloaded.

Labels: integers are class indices (C = ``len(class_names)`` or the largest training label + 1, which may
not exceed the number of training sequences);
any other labels are names, sorted into classes (numerically when they all read as numbers). There must be
at least 2 classes.
Test split: ``test_path`` if given, else the file's own, else ``test_fraction`` of the sequences
drawn with a fixed seed. Every problem raises ``DataFileError`` naming the array, sequence and step.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.data import Dataset, DataUnavailable

SKTIME_PREFIX = "sktime:"
SPLIT_SEED = 0


class DataFileError(ValueError):
    """A data file is missing, malformed or inconsistent (the message says where)."""


@dataclass
class _Split:
    x: np.ndarray  # (N, T, *F) float64, padding zeroed
    lengths: np.ndarray  # (N,) int64 in 1..T
    labels: np.ndarray  # (N,) int64 class indices, or str names (mapped in _classes)
    where: str  # "x" / "x_test" / a file name, for messages


def is_data_argument(arg: str) -> bool:
    return arg.startswith(SKTIME_PREFIX) or Path(arg).suffix.lower() in (".npz", ".csv", ".ts")


def source_of(arg: str) -> str:
    """``arg`` as a model folder records it: a file path made absolute, so that ``load_source`` finds the
    file again from any working directory (``sktime:<Name>`` as it is)."""
    return arg if arg.startswith(SKTIME_PREFIX) else os.path.abspath(arg)


def load_data_file(path: str, *, test_path: str | None = None, test_fraction: float = 0.2) -> Dataset:
    """Read ``path`` (and its test split) into a checked ``Dataset`` of padded float32 tensors."""
    files = _resolve(path)
    train, test, class_names = _read(files[0])
    if test_path is not None:
        test, _, test_names = _read(_resolve(test_path)[0], is_test=True)
        if class_names is None:
            class_names = test_names
    elif test is None and len(files) > 1:
        test, _, _ = _read(files[1], is_test=True)
    if test is None:
        train, test = _draw_test(train, test_fraction)
    if test.x.shape[2:] != train.x.shape[2:]:
        raise DataFileError(f"test set: steps of shape {test.x.shape[2:]} (features), the training set has "
                            f"{train.x.shape[2:]}: both must have the same features")
    y_train, y_test, class_names = _classes(train, test, class_names)
    if len(class_names) < 2:  # trained to '100%' by always answering it: a wrong label column went unnoticed
        raise DataFileError(f"{train.where.replace('x', 'y', 1)}: every sequence has class {class_names[0]!r}; "
                            "a classifier needs at least 2 classes")
    T = max(train.x.shape[1], test.x.shape[1])
    name = _name(path)
    n_steps = np.concatenate([train.lengths, test.lengths])
    feats = "x".join(map(str, train.x.shape[2:]))
    steps = f"{n_steps.min()}-{n_steps.max()}" if n_steps.min() != n_steps.max() else str(T)
    description = (f"{name} (`--data {path}`): {len(y_train)} train / {len(y_test)} test sequences, "
                   f"{steps} steps x {feats} features, {len(class_names)} classes")
    return Dataset(name, _tensor(train.x, T), torch.from_numpy(y_train), _tensor(test.x, T), torch.from_numpy(y_test),
                   list(class_names), description, lengths_train=_lengths(train.lengths, T),
                   lengths_test=_lengths(test.lengths, T), source=source_of(path))


def load_source(config: dict) -> Dataset:
    """The data a model folder was trained on, from its config.json: a built-in data set or its ``--data`` file."""
    from model.data import DATASETS, load_dataset

    source = str(config.get("data") or config.get("dataset") or "")
    if source in DATASETS:
        return load_dataset(source)
    if not source:
        raise DataFileError("the model folder does not say which data it was trained on")
    # the held-out part training drew (--test-fraction); a folder that does not record it used the default
    drawn = {} if config.get("test_fraction") is None else {"test_fraction": float(config["test_fraction"])}
    return load_data_file(source, test_path=config.get("test_data"), **drawn)


# ----- files ------------------------------------------------------------------------------------
def _resolve(arg: str) -> list[Path]:
    """The file(s) an argument names: [train] or [train, test] (a .ts pair)."""
    if arg.startswith(SKTIME_PREFIX):
        name = arg[len(SKTIME_PREFIX):]
        spec = importlib.util.find_spec("sktime")
        if spec is None or not spec.submodule_search_locations:
            raise DataUnavailable(f"{arg} needs the sktime package: pip install sktime")
        folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
        files = [folder / f"{name}_TRAIN.ts", folder / f"{name}_TEST.ts"]
        if not files[0].is_file():
            raise DataFileError(f"{arg}: the installed sktime has no {files[0].name} under {folder.parent}")
        return [f for f in files if f.is_file()]
    p = Path(arg)
    if not p.is_file():
        raise DataFileError(f"{arg}: no such file")
    if p.suffix.lower() not in (".npz", ".csv", ".ts"):
        raise DataFileError(f"{arg}: unknown format {p.suffix!r}; expected .npz, .csv or .ts (or sktime:<Name>)")
    sibling = p.with_name(p.name.replace("_TRAIN.ts", "_TEST.ts"))
    return [p, sibling] if p.name.endswith("_TRAIN.ts") and sibling.is_file() else [p]


def _read(path: Path, is_test: bool = False) -> tuple[_Split, _Split | None, list[str] | None]:
    """(split, its own test split or None, class names or None) from one file."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, is_test)
    if suffix == ".csv":
        return _read_csv(path), None, None
    return _read_ts(path), None, None


def _read_npz(path: Path, is_test: bool) -> tuple[_Split, _Split | None, list[str] | None]:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as e:
        raise DataFileError(f"{path.name}: cannot be read ({e.strerror})") from e
    if not magic.startswith(b"PK"):  # numpy would take anything else for a pickle, and advise loading it unsafely
        what = "a single .npy array" if magic == b"\x93NUMPY" else "not a zip archive"
        raise DataFileError(f"{path.name}: not an .npz file ({what}); save x and y with numpy.savez or "
                            "numpy.savez_compressed")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if "allow_pickle" in str(e):
            raise DataFileError(f"{path.name}: holds an array of Python objects (ragged lists, mixed types), which "
                                "is not loaded: save numeric arrays, labels as integers or strings") from e
        raise DataFileError(f"{path.name}: a damaged .npz file ({type(e).__name__}: {e})") from e
    prefix = "x_test" if is_test and "x_test" in arrays and "x" not in arrays else "x"
    suffix = prefix[1:]  # "" or "_test"
    for key in (f"x{suffix}", f"y{suffix}"):
        if key not in arrays:
            raise DataFileError(f"{path.name}: no array {key!r} (found {sorted(arrays)}); "
                                "expected x (N, T, features...) and y (N,)")
    split = _split(arrays[f"x{suffix}"], arrays[f"y{suffix}"], arrays.get(f"lengths{suffix}"), f"x{suffix}")
    test = None
    if not suffix and "x_test" in arrays:
        if "y_test" not in arrays:
            raise DataFileError(f"{path.name}: x_test without y_test")
        test = _split(arrays["x_test"], arrays["y_test"], arrays.get("lengths_test"), "x_test")
    names = arrays.get("class_names")
    if names is None:
        return split, test, None
    names = [str(n) for n in names.reshape(-1)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # two classes of one name: a served prediction could not say which it is
        raise DataFileError(f"{path.name}: class_names: {twice[0]!r} names more than one class; each must be unique")
    return split, test, names


def _split(x: np.ndarray, y: np.ndarray, lengths: np.ndarray | None, where: str) -> _Split:
    """Check one split's arrays: shapes, integer labels, lengths in 1..T, finite values on valid steps."""
    yname, lname = where.replace("x", "y", 1), where.replace("x", "lengths", 1)
    if x.ndim < 3:
        raise DataFileError(f"{where}: expected shape (N, T, features...), got {x.shape}"
                            + ("; one feature per step is (N, T, 1): x[..., None]" if x.ndim == 2 else ""))
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataFileError(f"{where}: expected real numbers, got dtype {x.dtype}")
    N, T = x.shape[:2]
    if N == 0 or T == 0:
        raise DataFileError(f"{where}: no sequences or no steps (shape {x.shape})")
    if y.shape != (N,):
        raise DataFileError(f"{yname}: expected shape ({N},), one label per sequence of {where}, got {y.shape}")
    if lengths is None:
        lengths = np.full(N, T, dtype=np.int64)
    else:
        if lengths.shape != (N,) or not np.issubdtype(lengths.dtype, np.integer):
            raise DataFileError(f"{lname}: expected ({N},) integers, got shape {lengths.shape} dtype {lengths.dtype}")
        bad = np.flatnonzero((lengths < 1) | (lengths > T))
        if bad.size:
            raise DataFileError(f"{lname}: sequence {bad[0]} has length {lengths[bad[0]]}, expected 1..T={T}")
    x = x.astype(np.float64)
    valid = np.arange(T)[None, :] < lengths[:, None]  # (N, T)
    finite = np.isfinite(x.reshape(N, T, -1)).all(axis=2)
    bad_steps = np.argwhere(valid & ~finite)
    if bad_steps.size:
        n, t = bad_steps[0]
        raise DataFileError(f"{where}: NaN or Inf at sequence {n}, step {t} ({len(bad_steps)} steps in all); "
                            "only padding past a sequence's length may hold them")
    big = np.argwhere(valid & (np.abs(x.reshape(N, T, -1)) > np.finfo(np.float32).max).any(axis=2))
    if big.size:  # finite here, Inf once stored as float32 (training's type): the net refused it mid-run
        n, t = big[0]
        raise DataFileError(f"{where}: a value past float32's range (|x| > {np.finfo(np.float32).max:.3g}) at "
                            f"sequence {n}, step {t} ({len(big)} steps in all)")
    x[~valid] = 0.0  # padding is zero
    if y.dtype.kind in "iu":
        labels = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataFileError(f"{yname}: labels must be whole numbers (class indices) or names")
        labels = y.astype(np.int64)
    elif y.dtype.kind in "US":
        labels = y.astype(str)
    else:
        raise DataFileError(f"{yname}: expected integer class indices or names, got dtype {y.dtype}")
    return _Split(x=x, lengths=lengths.astype(np.int64), labels=labels, where=where)


def _read_csv(path: Path) -> _Split:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path.name}: not UTF-8 text ({e.reason} at byte {e.start}); save the CSV as UTF-8") from e
    except (OSError, csv.Error) as e:
        raise DataFileError(f"{path.name}: not a readable CSV file ({e})") from e
    if rows and not _is_number(rows[0][1] if len(rows[0]) > 1 else ""):
        rows = rows[1:]  # a header row
    if not rows:
        raise DataFileError(f"{path.name}: no data rows")
    width = len(rows[0])
    if width < 4:
        raise DataFileError(f"{path.name}: a row needs sequence, step, at least one feature and a label; "
                            f"got {width} columns")
    seqs: dict[str, dict[int, tuple[list[float], str]]] = {}
    for i, r in enumerate(rows, 1):
        if len(r) != width:
            raise DataFileError(f"{path.name}: data row {i} has {len(r)} columns, the first has {width}")
        try:
            step = int(r[1])
            feats = [float(c) for c in r[2:-1]]
        except ValueError:
            raise DataFileError(f"{path.name}: data row {i}: step must be an integer and features numbers, "
                                f"got {r}") from None
        steps = seqs.setdefault(r[0].strip(), {})
        if step in steps:
            raise DataFileError(f"{path.name}: sequence {r[0]!r} has step {step} twice")
        steps[step] = (feats, r[-1].strip())
    T = max(len(s) for s in seqs.values())
    x = np.zeros((len(seqs), T, width - 3))
    lengths, labels = np.zeros(len(seqs), dtype=np.int64), []
    numeric = all(_is_number(sid) for sid in seqs)
    order = sorted(seqs, key=float if numeric else str)  # sequences in id order, whatever the row order
    for n, sid in enumerate(order):
        steps = seqs[sid]
        if sorted(steps) != list(range(len(steps))):
            raise DataFileError(f"{path.name}: sequence {sid!r} has steps {sorted(steps)[:8]}..., expected 0..L-1")
        names = {lab for _, lab in steps.values()}
        if len(names) != 1:
            raise DataFileError(f"{path.name}: sequence {sid!r} has more than one label: {sorted(names)}")
        x[n, :len(steps)] = [steps[t][0] for t in range(len(steps))]
        lengths[n], labels = len(steps), [*labels, names.pop()]
    y = np.array(labels)
    if all(_is_int(v) for v in labels):
        y = y.astype(np.int64)
    return _split(x, y, lengths, path.name)


def _read_ts(path: Path) -> _Split:
    if importlib.util.find_spec("sktime") is None:
        raise DataUnavailable(f"{path.name}: reading .ts files needs the sktime package: pip install sktime")
    from sktime.datasets import load_from_tsfile_to_dataframe

    try:
        frame, y = load_from_tsfile_to_dataframe(str(path))
    except Exception as e:  # sktime raises its own IOError subclasses and ValueErrors for malformed files
        raise DataFileError(f"{path.name}: not a readable .ts file ({e})") from e
    seqs = []
    for n in range(len(frame)):
        dims = [np.asarray(frame.iloc[n, d], dtype=np.float64) for d in range(frame.shape[1])]
        if len({len(d) for d in dims}) != 1:
            raise DataFileError(f"{path.name}: sequence {n} has dimensions of different lengths")
        seqs.append(np.stack(dims, axis=1))  # (L, D)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    x = np.zeros((len(seqs), int(lengths.max()), frame.shape[1]))
    for n, s in enumerate(seqs):
        x[n, :len(s)] = s
    return _split(x, np.asarray(y).astype(str), lengths, path.name)


# ----- classes, splits, tensors -------------------------------------------------------------------
def _classes(train: _Split, test: _Split, names: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class indices of both splits and the class names; raises on a label out of range."""
    if train.labels.dtype.kind != test.labels.dtype.kind:
        raise DataFileError("labels: the training set and the test set must both use class indices or both names")
    if train.labels.dtype.kind == "i":
        C = len(names) if names is not None else int(train.labels.max()) + 1
        for s in (train, test):
            bad = np.flatnonzero((s.labels < 0) | (s.labels >= C))
            if bad.size:
                why = f"{len(names)} class_names" if names is not None else f"the training labels 0..{C - 1}"
                raise DataFileError(f"{s.where.replace('x', 'y', 1)}: label {s.labels[bad[0]]} of sequence {bad[0]} "
                                    f"is out of range: {why}")
        if names is None and C > len(train.labels):  # C names and a readout of C classes: refuse a stray index
            i = int(train.labels.argmax())
            raise DataFileError(f"{train.where.replace('x', 'y', 1)}: label {C - 1} of sequence {i} makes {C} classes "
                                f"for {len(train.labels)} training sequences; class indices are 0..C-1 (give "
                                "class_names, or use names as labels)")
        return train.labels, test.labels, names or [str(i) for i in range(C)]
    found = sorted(set(train.labels.tolist()), key=lambda v: (float(v), v) if _is_number(v) else (float("inf"), v))
    if names is not None and set(found) - set(names):
        raise DataFileError(f"labels {sorted(set(found) - set(names))} are not in class_names")
    names = names or found
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(test.labels.tolist()) - set(index))
    if unseen:
        raise DataFileError(f"test set: label {unseen[0]!r} is out of range: it never occurs in the training data "
                            f"(classes {names})")
    return (np.array([index[v] for v in train.labels], dtype=np.int64),
            np.array([index[v] for v in test.labels], dtype=np.int64), list(names))


def _draw_test(split: _Split, fraction: float) -> tuple[_Split, _Split]:
    if not 0 < fraction < 1:
        raise DataFileError(f"test fraction must be in (0, 1), got {fraction}")
    N = len(split.labels)
    n_test = max(1, round(N * fraction))
    if n_test >= N:
        raise DataFileError(f"{split.where}: {N} sequences are too few to hold out a test split")
    order = np.random.default_rng(SPLIT_SEED).permutation(N)
    te, tr = np.sort(order[:n_test]), np.sort(order[n_test:])
    part = lambda idx, w: _Split(split.x[idx], split.lengths[idx], split.labels[idx], w)  # noqa: E731
    return part(tr, split.where), part(te, f"{split.where} (held-out test part)")


def _tensor(x: np.ndarray, T: int) -> torch.Tensor:
    pad = np.zeros((x.shape[0], T - x.shape[1], *x.shape[2:]))
    return torch.from_numpy(np.concatenate([x, pad], axis=1).astype(np.float32))


def _lengths(lengths: np.ndarray, T: int) -> torch.Tensor | None:
    return None if bool(np.all(lengths == T)) else torch.from_numpy(lengths)


def _name(arg: str) -> str:
    if arg.startswith(SKTIME_PREFIX):
        return arg[len(SKTIME_PREFIX):].lower()
    stem = Path(arg).stem
    for tail in ("_TRAIN", "_TEST", "_train", "_test"):
        stem = stem.removesuffix(tail)
    return stem.lower()


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _is_int(s: str) -> bool:
    try:
        return int(s) >= 0
    except ValueError:
        return False


__all__ = ["DataFileError", "load_data_file", "load_source", "is_data_argument", "source_of", "SKTIME_PREFIX"]
