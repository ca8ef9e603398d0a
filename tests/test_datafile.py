"""``psn train --data``: .npz, CSV and .ts files, their checks, variable lengths, per-feature normalisation.

Small data sets are generated here: a class is a tone of its own frequency on feature 0 and a ramp on
feature 1, with noise, so a tiny net learns it in a few epochs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.cli import main as psn_main
from model.data import Dataset, final_scores
from model.datafile import DataFileError, load_data_file
from model.evaluate import streamed_scores
from model.folder import load_model_folder
from model.network import LayerConfig, NetConfig, PSNNet, masked_batch_norm
from model.report import check_reference
from model.train import main as train_main
from model.train import parse_args, train

REPO = Path(__file__).resolve().parents[1]
FAST = ["--neuron", "sliding", "-k", "3", "--layers", "L24", "--epochs", "3", "--batch-size", "16", "--lr", "2e-2",
        "--threads", "1", "--quiet"]


def make_sequences(n: int, T: int, *, seed: int, variable: bool, classes: int = 3):
    """x (n, T, 2) with NaN padding past each length, y (n,), lengths (n,)."""
    g = np.random.default_rng(seed)
    y = g.integers(0, classes, n)
    lengths = g.integers(3, T + 1, n) if variable else np.full(n, T)
    t = np.arange(T)
    x = np.stack([np.sin(t[None, :] * (y[:, None] + 1) * 0.7), (y[:, None] - 1.0) * t[None, :] / T], axis=2)
    x = 5.0 + 3.0 * x + 0.1 * g.standard_normal((n, T, 2))
    x[:, :, 1] *= 100.0  # a feature on another scale: per-feature normalisation matters
    x[t[None, :] >= lengths[:, None]] = np.nan  # padding may hold anything
    return x, y, lengths


def write_npz(path: Path, *, variable: bool, **override) -> Path:
    x, y, lengths = make_sequences(90, 10, seed=1, variable=variable)
    xt, yt, lt = make_sequences(40, 12, seed=2, variable=variable)  # a test set with longer sequences
    arrays = {"x": x, "y": y, "x_test": xt, "y_test": yt, "class_names": np.array(["low", "mid", "high"])}
    if variable:
        arrays |= {"lengths": lengths, "lengths_test": lt}
    else:
        arrays["x"], arrays["x_test"] = x, xt[:, :10]
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_csv(path: Path, x: np.ndarray, y, lengths, *, header: bool = True, shuffle: bool = True) -> Path:
    rows = [[f"s{n:03d}", t, *x[n, t].tolist(), y[n]] for n in range(len(y)) for t in range(lengths[n])]
    if shuffle:
        rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["sequence", "step", *(f"f{i}" for i in range(x.shape[2])), "label"])
        w.writerows(rows)
    return path


def write_ts(path: Path, x: np.ndarray, y, lengths) -> Path:
    """A multivariate, unequal-length .ts file (UEA/UCR archive format)."""
    labels = sorted({str(v) for v in y})
    lines = ["@problemName tiny", "@timeStamps false", "@missing false", "@univariate false",
             f"@dimensions {x.shape[2]}", "@equalLength false", f"@classLabel true {' '.join(labels)}", "@data"]
    for n in range(len(y)):
        dims = [",".join(repr(float(v)) for v in x[n, :lengths[n], d]) for d in range(x.shape[2])]
        lines.append(":".join(dims) + f":{y[n]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(data: str, out: Path, *extra: str) -> Path:
    assert psn_main(["train", "--data", data, *FAST, *extra, "--out", str(out)]) == 0
    return out


def _check_folder(out: Path, x: np.ndarray, y: np.ndarray, lengths: np.ndarray) -> None:
    """The folder alone reproduces its stored predictions; streaming each test sequence (unpadded, alone)
    gives the parallel form's answer and the metrics' accuracy on the true lengths."""
    assert check_reference(out) < 1e-4
    model = load_model_folder(out)
    m = model.metrics
    answers, per_step = [], []  # per_step[n][t]: sample n's answer after t+1 steps (its final one past its end)
    for n in range(len(y)):
        xs = torch.tensor(x[n, :lengths[n]], dtype=torch.float32)
        with torch.no_grad():
            par = model.net(xs.unsqueeze(1)).scores[:, 0]  # (L, C)
        streamed = streamed_scores(model.net, xs.unsqueeze(0))[0]
        assert float((par[-1] - streamed).abs().max()) < 1e-4
        answers.append(int(par[-1].argmax()))
        per_step.append([int(par[min(t, len(par) - 1)].argmax()) for t in range(m["T"])])
    acc = float(np.mean(np.array(answers) == y))
    assert m["test_acc_parallel"] == pytest.approx(acc, abs=1e-5)
    assert m["test_acc_streaming"] == pytest.approx(acc, abs=1e-5)
    np.testing.assert_allclose(m["acc_per_step"], (np.array(per_step) == y[:, None]).mean(0), atol=1e-5)
    ref = json.loads((out / "reference.json").read_text())
    assert ref["predictions"] == [answers[i] for i in ref["test_index"]]
    assert set(ref["y"]) == set(y.tolist())  # a sample of each class


def test_fixed_length_npz_trains_a_loadable_folder(tmp_path):
    path = write_npz(tmp_path / "tones.npz", variable=False)
    out = _train(str(path), tmp_path / "tones")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "tones" and cfg["data"] == str(path) and cfg["class_names"] == ["low", "mid", "high"]
    assert cfg["net"]["input_shape"] == [2] and cfg["net"]["T"] is None
    m = json.loads((out / "metrics.json").read_text())
    assert m["T"] == 10 and m["test_samples"] == 40 and m["variable_length"] is False
    assert m["test_acc_streaming"] > 0.5  # chance is 1/3
    with np.load(path) as f:
        xt, yt = f["x_test"], f["y_test"]
    _check_folder(out, xt, yt, np.full(len(yt), 10))


def test_variable_length_npz_scores_each_sequence_at_its_own_end(tmp_path):
    path = write_npz(tmp_path / "var.npz", variable=True)
    out = _train(str(path), tmp_path / "var")
    with np.load(path) as f:
        x, lengths, xt, yt, lt = f["x"], f["lengths"], f["x_test"], f["y_test"], f["lengths_test"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["variable_length"] is True and m["T"] == 12 and len(m["acc_per_step"]) == 12
    ref = json.loads((out / "reference.json").read_text())
    assert ref["lengths"] == lt[ref["test_index"]].tolist()
    _check_folder(out, xt, yt, lt)
    # normalisation: per feature, from the valid training steps only (NaN padding ignored)
    valid = np.concatenate([x[n, :lengths[n]] for n in range(len(lengths))])
    cfg = load_model_folder(out).cfg
    np.testing.assert_allclose(cfg.input_mean, valid.mean(0), rtol=1e-6)
    np.testing.assert_allclose(cfg.input_std, valid.std(0, ddof=1), rtol=1e-6)


def test_csv_and_ts_read_the_same_sequences_as_npz(tmp_path):
    x, y, lengths = make_sequences(30, 8, seed=3, variable=True)
    names = np.array(["low", "mid", "high"])[y]
    ref = load_data_file(str(write_npz(tmp_path / "a.npz", variable=True, x=x, y=y, lengths=lengths, x_test=None,
                                       y_test=None, lengths_test=None, class_names=None)))
    from_csv = load_data_file(str(write_csv(tmp_path / "a.csv", x, y, lengths)))
    no_header = load_data_file(str(write_csv(tmp_path / "b.csv", x, y, lengths, header=False, shuffle=False)))
    from_ts = load_data_file(str(write_ts(tmp_path / "a_TRAIN.ts", x, y, lengths)))
    for d in (from_csv, no_header, from_ts):
        for part in ("x_train", "y_train", "x_test", "y_test", "lengths_train", "lengths_test"):
            assert torch.allclose(getattr(d, part).double(), getattr(ref, part).double(), atol=1e-5), part
    assert ref.class_names == ["0", "1", "2"] and from_ts.class_names == ["0", "1", "2"]
    assert ref.x_test.shape[0] == 6  # no test split in the file: 20% held out with a fixed seed
    # named labels (CSV) become classes in sorted order
    named = load_data_file(str(write_csv(tmp_path / "n.csv", x, names, lengths)))
    assert named.class_names == ["high", "low", "mid"]
    assert [named.class_names[i] for i in named.y_train] == [str(v) for v in names[np.sort(
        np.random.default_rng(0).permutation(30)[6:])]]


def test_ts_pair_trains_and_takes_the_test_file(tmp_path):
    x, y, lengths = make_sequences(60, 9, seed=4, variable=True)
    xt, yt, lt = make_sequences(20, 9, seed=5, variable=True)
    write_ts(tmp_path / "Tiny_TRAIN.ts", x, y, lengths)
    write_ts(tmp_path / "Tiny_TEST.ts", xt, yt, lt)
    out = _train(str(tmp_path / "Tiny_TRAIN.ts"), tmp_path / "tiny")
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "tiny" and m["test_samples"] == 20 and m["train_samples"] == 60
    _check_folder(out, xt, yt, lt)


def test_shipped_sktime_data_set_is_found_in_the_wheel():
    pytest.importorskip("sktime")
    d = load_data_file("sktime:JapaneseVowels")
    assert d.x_train.shape == (270, 29, 12) and d.x_test.shape == (370, 29, 12)
    assert d.class_names == [str(i) for i in range(1, 10)]
    assert int(d.lengths_train.min()) == 7 and int(d.lengths_test.max()) == 29
    assert bool((d.x_train[0, int(d.lengths_train[0]):] == 0).all())


def test_padding_does_not_change_training(tmp_path):
    """Whatever the padding holds, a run gives the same weights: the loss reads each sequence at its own
    end and batch norm takes statistics from valid steps only."""
    x, y, lengths = make_sequences(64, 10, seed=6, variable=True)
    x = np.nan_to_num(x, nan=0.0)
    path = write_npz(tmp_path / "p.npz", variable=True, x=x, y=y, lengths=lengths)
    a = parse_args(["--data", str(path), *FAST, "--out", str(tmp_path / "never")])
    weights = []
    for fill in (0.0, 1e3):
        d = a.loaded
        pad = ~(torch.arange(d.T).unsqueeze(0) < d.lengths_train.unsqueeze(1))
        xp = d.x_train.clone()
        xp[pad] = fill
        data = Dataset(d.name, xp, d.y_train, d.x_test, d.y_test, d.class_names, d.description,
                       lengths_train=d.lengths_train, lengths_test=d.lengths_test, source=d.source)
        torch.manual_seed(0)
        cfg = NetConfig(input_shape=(2,), num_classes=3, layers=(LayerConfig("linear", 16), LayerConfig("linear", 8)),
                        neuron="sliding", k=3, input_mean=(5.0, 500.0), input_std=(3.0, 300.0))
        net = train(PSNNet(cfg), data, a).net
        weights.append({k: v.clone() for k, v in net.state_dict().items()})
    for k in weights[0]:
        assert torch.allclose(weights[0][k].double(), weights[1][k].double(), atol=1e-6), k


def test_masked_batch_norm_is_batch_norm_of_the_valid_rows():
    torch.manual_seed(0)
    for shape in ((12, 4), (12, 3, 5)):
        ours, ref = torch.nn.BatchNorm1d(shape[1]), torch.nn.BatchNorm1d(shape[1])
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            ours.bias.uniform_(-1.0, 1.0)
        ref.load_state_dict(ours.state_dict())
        for _ in range(3):
            y, valid = torch.randn(*shape) * 3 + 1, torch.rand(shape[0]) < 0.6
            out = masked_batch_norm(ours, y, valid)
            torch.testing.assert_close(out[valid], ref(y[valid]))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == 3


def test_final_scores_reads_each_column_at_its_length():
    scores = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)
    got = final_scores(scores, torch.tensor([1, 4, 2]))
    assert got.tolist() == [scores[0, 0].tolist(), scores[3, 1].tolist(), scores[1, 2].tolist()]


# ----- bad files: each gets its own clear error before training -----------------------------------------
def _bad_npz(tmp_path: Path, **override) -> str:
    return str(write_npz(tmp_path / "bad.npz", variable=True, **override))


BAD = {
    "x without a feature axis": (lambda p: _bad_npz(p, x=np.zeros((90, 10))), "expected shape (N, T, features...)"),
    "y of the wrong length": (lambda p: _bad_npz(p, y=np.zeros(7, dtype=int)), "y: expected shape (90,)"),
    "NaN inside a sequence": (lambda p: _bad_npz(p, x=np.full((90, 10, 2), np.nan)),
                              "NaN or Inf at sequence 0, step 0"),
    "label out of range": (lambda p: _bad_npz(p, y=np.full(90, 3)), "label 3 of sequence 0 is out of range"),
    "negative label": (lambda p: _bad_npz(p, y_test=np.full(40, -1)), "y_test: label -1 of sequence 0"),
    "test set with other features": (lambda p: _bad_npz(p, x_test=np.zeros((40, 12, 3))),
                                     "test set: steps of shape (3,)"),
    "length past T": (lambda p: _bad_npz(p, lengths=np.full(90, 11)), "lengths: sequence 0 has length 11"),
    "fractional labels": (lambda p: _bad_npz(p, y=np.full(90, 0.5)), "labels must be whole numbers"),
    "unknown format": (lambda p: str(_write(p / "data.parquet", "x")), "unknown format '.parquet'"),
    "missing file": (lambda p: str(p / "nowhere.npz"), "no such file"),
    "csv step twice": (lambda p: _csv_text(p, "a,0,1.0,x\na,0,2.0,x\n"), "sequence 'a' has step 0 twice"),
    "csv two labels": (lambda p: _csv_text(p, "a,0,1.0,x\na,1,2.0,y\n"), "more than one label"),
    "csv gap in steps": (lambda p: _csv_text(p, "a,0,1.0,x\na,2,2.0,x\n"), "expected 0..L-1"),
    "csv text feature": (lambda p: _csv_text(p, "a,0,high,x\n"), "features numbers"),
    "ts not a ts file": (lambda p: str(_write(p / "junk.ts", "hello\n")), "not a readable .ts file"),
    "x_test without y_test": (lambda p: _bad_npz(p, y_test=None), "bad.npz: x_test without y_test"),
    "text x": (lambda p: _bad_npz(p, x=np.full((90, 10, 2), "a")), "x: expected real numbers, got dtype <U1"),
    "complex x": (lambda p: _bad_npz(p, x_test=np.full((40, 12, 2), 1 + 2j)),
                  "x_test: expected real numbers, got dtype complex128"),
    "no sequences": (lambda p: _bad_npz(p, x=np.zeros((0, 10, 2)), y=np.zeros(0, dtype=int)),
                     "x: no sequences or no steps"),
    "fractional lengths": (lambda p: _bad_npz(p, lengths=np.full(90, 3.0)), "lengths: expected (90,) integers"),
    "length 0": (lambda p: _bad_npz(p, lengths=np.r_[4, 0, np.full(88, 4)]), "lengths: sequence 1 has length 0"),
    "names outside class_names": (lambda p: _bad_npz(p, y=np.array(["low", "mid", "top"] * 30),
                                                     y_test=np.array(["low"] * 40)),
                                  "labels ['top'] are not in class_names"),
    "test label never in training": (lambda p: _bad_npz(p, y=np.array(["a", "b", "c"] * 30), class_names=None,
                                                        y_test=np.array(["a"] * 39 + ["q"])),
                                     "test set: label 'q' is out of range"),
    "indices and names mixed": (lambda p: _bad_npz(p, y_test=np.array(["low"] * 40)),
                                "both use class indices or both names"),
    "a stray huge class index": (lambda p: _bad_npz(p, y=np.r_[np.zeros(89, dtype=np.int64), 10**12],
                                                                class_names=None),
                                 "y: label 1000000000000 of sequence 89 makes 1000000000001 classes for 90 training"),
    "csv of 3 columns": (lambda p: _csv_text(p, "a,0,x\na,1,x\n"), "got 3 columns"),
    "csv not UTF-8": (lambda p: str(_write_bytes(p / "bad.csv", "séq,step,f0,label\na,0,1.0,x\n".encode("latin-1"))),
                      "bad.csv: not UTF-8 text"),  # UnicodeDecodeError's traceback
    "x past float32": (lambda p: _bad_npz(p, x_test=np.full((40, 12, 2), 1e39)),  # InputError after loading
                       "x_test: a value past float32's range (|x| > 3.4e+38) at sequence 0, step 0"),
    "class_names twice": (lambda p: _bad_npz(p, class_names=np.array(["low", "mid", "low"])),
                          "class_names: 'low' names more than one class"),  # trained and served as two 'low's
    "one class": (lambda p: _csv_text(p, "".join(f"s{n},{t},{n + t},same\n" for n in range(6) for t in range(3))),
                  "bad.csv: every sequence has class 'same'; a classifier needs at least 2 classes"),
    "one class_name": (lambda p: _bad_npz(p, y=np.zeros(90, dtype=int), y_test=np.zeros(40, dtype=int),
                                          class_names=np.array(["only"])), "y: every sequence has class 'only'"),
    "npz not a zip": (lambda p: str(_write(p / "notes.npz", "garbage\n")),
                      "notes.npz: not an .npz file (not a zip archive); save x and y with numpy.savez"),  # 'unsafely'
    "npy named npz": (lambda p: str(_save_npy(p / "x.npz")), "x.npz: not an .npz file (a single .npy array)"),
    "npz cut short": (lambda p: str(_write_bytes(p / "cut.npz", Path(_bad_npz(p)).read_bytes()[:300])),
                      "cut.npz: a damaged .npz file (BadZipFile: "),  # BadZipFile's traceback
    "npz of objects": (lambda p: _bad_npz(p, y=np.array([[1], [1, 2]] * 45, dtype=object)),
                       "bad.npz: holds an array of Python objects (ragged lists, mixed types), which is not loaded"),
    "csv rows of two widths": (lambda p: _csv_text(p, "a,0,1.0,x\na,1,2.0,3.0,x\n"),
                               "data row 2 has 5 columns, the first has 4"),
}


def _csv_text(tmp_path: Path, text: str) -> str:
    return str(_write(tmp_path / "bad.csv", "seq,step,f0,label\n" + text))


def _save_npy(path: Path) -> Path:
    with open(path, "wb") as f:  # np.save would add .npy to the name
        np.save(f, np.zeros((4, 3, 2)))
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_fails_before_training_with_a_clear_error(case, tmp_path, capsys):
    make, message = BAD[case]
    data = make(tmp_path)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        train_main(["--data", data, *FAST, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()
    with pytest.raises(DataFileError, match="."):
        load_data_file(data)


def test_psn_neuron_refuses_variable_lengths_and_data_excludes_dataset(tmp_path, capsys):
    path = str(write_npz(tmp_path / "v.npz", variable=True))
    for argv, message in ((["--neuron", "psn"], "needs a causal neuron"), (["--dataset", "digits"], "not both")):
        with pytest.raises(SystemExit):
            train_main(["--data", path, *argv, "--out", str(tmp_path / "never"), "--quiet"])
        assert message in capsys.readouterr().err


def _one_step_csv(path: Path, ids: list[str], labels: list[str]) -> str:
    """One step per sequence whose feature is the sequence's position in the file."""
    path.write_text("".join(f"{sid},0,{i}.0,{lab}\n" for i, (sid, lab) in enumerate(zip(ids, labels, strict=True))))
    return str(path)


def test_csv_sequences_in_numeric_id_order_and_labels_as_indices_or_sorted_names(tmp_path):
    ids = [str(i) for i in range(11, 0, -1)]  # 11, 10, ..., 1: as text "10" < "2"
    path = _one_step_csv(tmp_path / "ids.csv", ids, ["0", "2"] * 5 + ["0"])
    d = load_data_file(path, test_path=path)
    assert d.x_train[:, 0, 0].tolist() == [10 - i for i in range(11)]  # sequences "1".."11" in that order
    assert d.class_names == ["0", "1", "2"] and sorted(set(d.y_train.tolist())) == [0, 2]  # indices, 1 unseen
    named = _one_step_csv(tmp_path / "named.csv", ids, ["-1", "10", "9"] * 3 + ["-1", "10"])
    d = load_data_file(named, test_path=named)  # a negative number is a name; names sort as numbers
    assert d.class_names == ["-1", "9", "10"]


def test_npz_byte_string_labels_are_names(tmp_path):
    x, y, _ = make_sequences(30, 6, seed=7, variable=False)
    path = write_npz(tmp_path / "b.npz", variable=False, x=x, y=np.array([b"lo", b"mid", b"hi"])[y], x_test=None,
                     y_test=None, class_names=None)
    d = load_data_file(str(path))
    assert d.class_names == ["hi", "lo", "mid"]
    got = sorted(d.class_names[i] for i in d.y_train.tolist() + d.y_test.tolist())
    assert got == sorted(np.array(["lo", "mid", "hi"])[y].tolist())


def test_a_test_file_gives_its_x_and_its_class_names(tmp_path):
    """--test-data: the test file's x (not its own x_test), and its class_names where the training file has none."""
    x, y, _ = make_sequences(30, 6, seed=8, variable=False)
    xt, yt, _ = make_sequences(12, 6, seed=9, variable=False)
    train = write_npz(tmp_path / "train.npz", variable=False, x=x, y=y, x_test=None, y_test=None, class_names=None)
    test = write_npz(tmp_path / "test.npz", variable=False, x=xt, y=yt, x_test=xt[:5], y_test=yt[:5],
                     class_names=np.array(["a", "b", "c"]))
    d = load_data_file(str(train), test_path=str(test))
    assert d.x_test.shape[0] == 12 and d.y_test.tolist() == yt.tolist()
    assert d.class_names == ["a", "b", "c"] and d.x_train.shape[0] == 30


def test_held_out_test_part_is_at_least_one_sequence_and_never_all(tmp_path):
    x, _, _ = make_sequences(3, 5, seed=10, variable=False)
    path = str(write_npz(tmp_path / "three_train.npz", variable=False, x=x, y=np.array([0, 1, 0]), x_test=None,
                         y_test=None, class_names=np.array(["a", "b"])))  # two classes, whichever is held out
    d = load_data_file(path, test_fraction=0.1)  # 0.3 of a sequence rounds to none: one is held out
    assert (d.x_train.shape[0], d.x_test.shape[0]) == (2, 1)
    assert d.name == "three"  # _train is not part of the name
    for fraction in (0.0, 1.0):
        with pytest.raises(DataFileError, match=r"test fraction must be in \(0, 1\)"):
            load_data_file(path, test_fraction=fraction)
    one = str(write_npz(tmp_path / "one.npz", variable=False, x=x[:1], y=np.zeros(1, dtype=int), x_test=None,
                        y_test=None, class_names=None))
    with pytest.raises(DataFileError, match="1 sequences are too few to hold out a test split"):
        load_data_file(one)


def _export(folder: Path) -> dict:
    """`python -m exported.export FOLDER` as a user runs it (from the repository); its onnx_parity.json."""
    proc = subprocess.run([sys.executable, "-m", "exported.export", str(folder), "--samples", "1000"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((folder / "onnx_parity.json").read_text())


def test_test_fraction_with_test_data_is_a_usage_error(tmp_path, capsys):
    """--test-data is the test split: a --test-fraction beside it did nothing, without a word."""
    x, y, _ = make_sequences(40, 8, seed=12, variable=False)
    path = write_npz(tmp_path / "d.npz", variable=False, x=x, y=y, x_test=None, y_test=None)
    with pytest.raises(SystemExit) as e:
        psn_main(["train", "--data", str(path), "--test-data", str(path), "--test-fraction", "0.5", *FAST,
                  "--out", str(tmp_path / "never")])
    assert e.value.code == 2 and "--test-data is the test split here" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_export_checks_the_held_out_part_that_training_held_out(tmp_path):
    """--test-fraction is recorded, so the export's real samples are the model's own test set (with the
    default fraction they were another split, training sequences among them, and parity still PASSED)."""
    x, y, _ = make_sequences(90, 8, seed=11, variable=False)
    path = write_npz(tmp_path / "held.npz", variable=False, x=x, y=y, x_test=None, y_test=None)
    out = _train(str(path), tmp_path / "held", "--test-fraction", "0.5")
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_samples"] == 45
    real = _export(out)["parity"]["real"]
    assert real["samples"] == 45
    assert real["acc_torch"] == pytest.approx(m["test_acc_parallel"], abs=1e-5)  # metrics: 5 digits


def test_relative_data_paths_are_found_again_from_another_directory(tmp_path):
    """`psn train --data x.npz --test-data t.npz` in the data's folder, then the export from the repository:
    the folder records where the files are, so the parity check reads the model's test set (a relative path
    was recorded as typed: 'real samples: skipped (x.npz: no such file)', and parity PASSED unchecked)."""
    x, y, _ = make_sequences(40, 8, seed=12, variable=False)
    xt, yt, _ = make_sequences(20, 8, seed=13, variable=False)
    write_npz(tmp_path / "rel.npz", variable=False, x=x, y=y, x_test=None, y_test=None)
    write_npz(tmp_path / "rel_test.npz", variable=False, x=xt, y=yt, x_test=None, y_test=None)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "model.train", "--data", "rel.npz", "--test-data", "rel_test.npz",
                           *FAST, "--out", "rel-model"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    real = _export(tmp_path / "rel-model")["parity"]["real"]
    assert "skipped" not in real and real["samples"] == 20
