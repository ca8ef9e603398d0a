"""Training command end to end, option checks, and the shipped models in exported/."""

from __future__ import annotations

import functools
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from model.cli import main as psn_main
from model.data import final_scores, fit_input_shape, load_dataset
from model.datafile import load_source
from model.evaluate import evaluate, parallel_scores, streamed_scores
from model.folder import find_model_folders, load_model_folder
from model.report import check_reference
from model.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = find_model_folders(ROOT / "exported")
TINY = ["--dataset", "digits", "--preset", "tiny", "--epochs", "2", "--train-limit", "400", "--test-limit", "120",
        "--batch-size", "32", "--lr", "3e-2", "--quiet"]


def _train(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert psn_main(["train", *TINY, *extra, "--out", str(out)]) == 0
    return out


def test_tiny_digits_run_writes_a_loadable_folder(tmp_path):
    out = _train(tmp_path, "digits-sliding")
    for f in ("config.json", "weights.safetensors", "metrics.json", "README.md", "training.png", "reference.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_acc_parallel", "test_acc_streaming", "acc_per_step", "params", "train_seconds", "machine",
                "epochs", "history"):
        assert key in m, key
    assert len(m["acc_per_step"]) == 8 and len(m["history"]) == 2 and m["test_samples"] == 120
    assert m["streaming_max_score_diff"] < 1e-4
    assert m["test_acc_streaming"] == pytest.approx(m["test_acc_parallel"], abs=1 / 120)
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | neuron |" in (out / "README.md").read_text()
    # the folder alone rebuilds the net and reproduces the stored predictions
    assert check_reference(out) < 1e-4
    loaded = load_model_folder(out)
    assert loaded.metrics["params"] == loaded.net.num_parameters() + 2 * 32  # BN scale and shift are folded away
    d = load_dataset("digits")
    ev = evaluate(loaded.net, d.x_test[:120], d.y_test[:120])
    assert ev.acc_parallel == pytest.approx(m["test_acc_parallel"], abs=1e-5)
    assert m["test_acc_parallel"] > 0.25  # it learned something in 2 short epochs (chance is 0.1)


def test_masked_run_is_saved_with_lam_one_and_streams(tmp_path):
    out = _train(tmp_path, "digits-masked", "--neuron", "masked", "-k", "4", "--layers", "C4k3s1,L24")
    loaded = load_model_folder(out)
    assert loaded.cfg.neuron == "masked" and loaded.cfg.T == 8 and loaded.cfg.input_shape == (1, 8)
    assert all(layer.neuron.lam == 1.0 for layer in loaded.net.layers)
    m = loaded.metrics
    assert m["test_acc_streaming"] is not None and m["streaming_agreement"] >= 0.99
    check_reference(out)


def test_same_seed_same_weights(tmp_path):
    a = load_file(str(_train(tmp_path, "a", "--epochs", "1", "--seed", "3") / "weights.safetensors"))
    b = load_file(str(_train(tmp_path, "b", "--epochs", "1", "--seed", "3") / "weights.safetensors"))
    c = load_file(str(_train(tmp_path, "c", "--epochs", "1", "--seed", "4") / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--neuron", "masked", "-k", "9"], "masked PSN needs k <= T; data set 'digits' has T=8"),
    (["-k", "0"], "-k must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "100000"], "--threads must be at most 1024"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--lr", "inf"], "--lr must be > 0 and finite, got inf"),  # trained to NaN weights, written, exit 0
    (["--alpha", "0"], "--alpha must be > 0"),  # a surrogate gradient of 0: no layer below the readout learned
    (["--alpha", "nan"], "--alpha must be > 0"),  # NaN weights, written, exit 0
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),  # torch's ValueError after loading the data
    (["--weight-decay", "nan"], "--weight-decay must be >= 0"),
    (["--noise", "-0.1"], "--noise must be >= 0"),  # silently no noise
    (["--noise", "inf"], "--noise must be >= 0"),
    (["--shift", "-2"], "--shift must be >= 0"),  # silently no shift
    (["--train-limit", "0"], "--train-limit must be >= 1"),
    (["--test-limit", "-3"], "--test-limit must be >= 1"),
    (["--test-data", "t.npz"], "--test-data needs --data"),
    (["--test-fraction", "0.3"], "a built-in data set has its own test split"),  # silently nothing
    (["--layers", "L32,Q3"], "bad layer 'Q3'"),
    (["--layers", "L32,C4k3s1"], "conv layers must all come before the linear layers"),
    (["--layers", "L0"], "bad layer 'L0': sizes, kernel and stride must be >= 1"),
    (["--layers", "C4k3s0,L8"], "bad layer 'C4k3s0'"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    (["--device", "meta"], "--device: expected auto, cpu, cuda or cuda:N, got 'meta'"),  # a traceback in training
])
def test_bad_options_fail_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        train_main(["--dataset", "digits", *argv, "--out", str(out), "--quiet"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_options_take_their_edges_and_each_data_set_its_own_preset(tmp_path):
    from model.options import PRESETS, parse_args

    a = parse_args(["--dataset", "digits", "--neuron", "masked", "-k", "8", "--out", str(tmp_path / "m")])
    assert a.k == 8 and a.preset == "tiny" and a.layers == PRESETS["tiny"]  # k = T is allowed; digits has no preset
    for dataset in ("mnist1d", "smnist"):
        a = parse_args(["--dataset", dataset])
        assert a.preset == dataset and a.layers == PRESETS[dataset] and a.out == f"exported/{dataset}-sliding"


def test_evaluate_reports_the_largest_streaming_difference_whichever_its_sign():
    """A step form that answers lower than the parallel form shows as a positive max_score_diff (a uniform
    offset leaves every prediction, so agreement stays 1)."""
    from model.network import LayerConfig, NetConfig, NetOutput, PSNNet

    class LowStream(PSNNet):  # a fault put into the step form: every streamed score 0.25 lower
        def step(self, x_t, state):
            out, state = super().step(x_t, state)
            return NetOutput(out.spikes, out.scores - 0.25), state

    torch.manual_seed(0)
    net = LowStream(NetConfig(input_shape=(3,), num_classes=4, layers=(LayerConfig("linear", 8),))).eval()
    x, y = torch.randn(10, 5, 3), torch.randint(0, 4, (10,))
    ev = evaluate(net, x, y)
    assert ev.max_score_diff == pytest.approx(0.25, abs=1e-5) and ev.agreement == 1.0
    assert ev.acc_streaming == ev.acc_parallel


@functools.cache
def _data(data: str, dataset: str):
    return load_source({"data": data, "dataset": dataset})


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_streams_exactly_like_the_parallel_form(folder):
    loaded = load_model_folder(folder)
    check_reference(folder)
    d = _data(loaded.config.get("data") or "", loaded.config["dataset"])
    n = 300
    x = fit_input_shape(d, loaded.cfg.input_shape).x_test[:n]
    lengths = None if d.lengths_test is None else d.lengths_test[:n]
    par = final_scores(parallel_scores(loaded.net, x), lengths)  # (N, C)
    stream = streamed_scores(loaded.net, x, lengths=lengths)
    assert torch.equal(par.argmax(1), stream.argmax(1))
    assert float((par - stream).abs().max()) < 1e-4
    m = loaded.metrics
    assert m["test_acc_streaming"] == pytest.approx(m["test_acc_parallel"], abs=2e-3)
    assert m["test_samples"] == d.x_test.shape[0]  # the full test set was measured
    assert len(m["acc_per_step"]) == d.T


def test_psn_console_script_points_at_the_cli(capsys):
    import importlib
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["psn"]
    module, func = target.split(":")
    entry = getattr(importlib.import_module(module), func)
    assert entry([]) == 2 and "psn {train}" in capsys.readouterr().err  # a usage error: stderr, not stdout
    assert entry(["-h"]) == 0 and "psn {train}" in capsys.readouterr().out
    assert entry(["serve-nothing"]) == 2 and "unknown command" in capsys.readouterr().err


def test_ctrl_c_during_training_says_nothing_was_written(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "never"
    # Ctrl-C as at a terminal, whatever this test inherited: a shell starts background jobs with SIGINT
    # ignored, and Python keeps an ignored SIGINT ignored (the run would go on for 100,000 epochs)
    proc = subprocess.Popen([sys.executable, "-m", "model.train", *TINY[:-1], "--epochs", "100000", "--out", str(out)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:  # wait until training has started
        lines.append(line)
        if "parameters" in line:
            break
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, "".join(lines)[-500:], rest[-3000:])  # what it said, if it fails
    assert "Traceback" not in rest and "nothing was written" in rest.strip().splitlines()[-1], rest
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_japanesevowels_recipe_reproduces_the_shipped_model(tmp_path):
    """The shipped JapaneseVowels run (about 30 s on one thread) writes the same weights again."""
    pytest.importorskip("sktime")
    folder = ROOT / "exported" / "japanesevowels-sliding"
    argv = json.loads((folder / "metrics.json").read_text())["command"].split()[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "jv")
    if "--compare" in argv:
        argv = argv[:argv.index("--compare")]
    assert psn_main(["train", *argv]) == 0
    again = load_file(str(tmp_path / "jv" / "weights.safetensors"))
    shipped = load_file(str(folder / "weights.safetensors"))
    assert all(torch.equal(again[k], shipped[k]) for k in shipped)
    assert json.loads((tmp_path / "jv" / "metrics.json").read_text())["test_acc_streaming"] >= 0.96


def test_model_folder_is_readable_by_every_user(tmp_path):
    """A container user other than the trainer must be able to read a written folder (weights included)."""
    out = _train(tmp_path, "perm", "--epochs", "1")
    assert out.stat().st_mode & 0o755 == 0o755
    for f in out.iterdir():
        assert f.stat().st_mode & 0o444 == 0o444, f"{f.name} is not world-readable"


def test_ctrl_c_is_answered_130_even_when_it_lands_in_code_run_from_c(tmp_path):
    """``python -m model.train``: CPython remembers a ``KeyboardInterrupt`` that passed through code run by
    ``PyRun_String`` (as native extensions run code) and, when a module run with ``-m`` ends, kills the
    process with SIGINT even though the interrupt was caught: training printed "nothing was written" and
    still exited -2 (2 of 30 Ctrl-Cs at random moments). ``main`` raises a subclass from its own SIGINT
    handler, which CPython does not remember; here the signal is made to land inside such code every time."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "ctrl_c_probe.py").write_text(textwrap.dedent('''
        import ctypes, signal, sys
        from model import train
        seen = []
        def run(a):  # in place of training: the Ctrl-C arrives while code run from C is running
            seen.append(signal.getsignal(signal.SIGINT))
            f = ctypes.pythonapi.PyRun_String
            f.restype = ctypes.py_object
            f.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
            g = {"__builtins__": __builtins__}
            f(b"import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass", 257, g, g)
        train.run = run
        code = train.main(sys.argv[1:])
        assert seen == [train._interrupted], seen  # main's own handler while it runs
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # and Python's again after
        raise SystemExit(code)
    '''))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "probe"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "ctrl_c_probe", *TINY, "--out", str(tmp_path / "never")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert "nothing was written" in proc.stderr and not (tmp_path / "never").exists()


def test_out_that_training_could_not_replace_is_refused_before_training(tmp_path, capsys):
    """--out is replaced as a whole at the end: a file there became a folder (the file left as a hidden
    '.NAME.old'), a folder of other files was deleted, and '.' or a path under a file failed with a traceback
    after training. Each is now a usage error that leaves what was there alone."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data.csv").write_text("mine")
    cases = [(tmp_path / "notes.txt", "exists and is not a folder"),
             (tmp_path / "notes.txt" / "m", "notes.txt is not a folder"),
             (tmp_path / "work", "no config.json, not a model folder"),
             (tmp_path / "work" / "..", "no config.json, not a model folder")]
    for out, message in cases:
        with pytest.raises(SystemExit) as e:
            train_main([*TINY, "--epochs", "1", "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "--out" in err, (out, err)
    with pytest.raises(SystemExit) as e:
        train_main([*TINY, "--out", ""])  # not the default exported/digits-sliding
    assert e.value.code == 2 and "--out is empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "work" / "data.csv").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "work"]
    # an empty folder and an earlier model folder are replaced, as before
    (tmp_path / "empty").mkdir()
    _train(tmp_path, "empty", "--epochs", "1")
    _train(tmp_path, "empty", "--epochs", "1")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_disk_that_fills_up_at_the_final_write_is_one_line_and_leaves_the_folder_as_it_was(tmp_path, capsys):
    """The folder is written at the very end; a disk that filled up meanwhile (here a tmpfs of 64 kB, too
    small for the weights and figure) was an OSError traceback after all the training. Now one line naming
    the folder and the reason, exit 1, and an earlier model folder there is left whole."""
    from tests.service.test_durable import small_disk

    disk = tmp_path / "disk"
    small_disk(disk, "64k")
    try:
        (disk / "m").mkdir()
        (disk / "m" / "config.json").write_text('{"earlier": true}')  # an earlier model folder's
        with pytest.raises(SystemExit) as e:
            train_main([*TINY, "--epochs", "1", "--layers", "L64,L64", "--out", str(disk / "m")])
        err = capsys.readouterr().err
        assert e.value.code == 1, err
        assert f"psn train: cannot write the model folder {disk / 'm'}: No space left on device" in err, err
        assert "nothing was written" in err and "Traceback" not in err
        assert [p.name for p in disk.iterdir()] == ["m"]  # no half-written temporary folder left to fill the disk
        assert [p.name for p in (disk / "m").iterdir()] == ["config.json"]
        assert (disk / "m" / "config.json").read_text() == '{"earlier": true}'
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_compare_folder_whose_metrics_cannot_make_a_row_is_refused_before_training(tmp_path, capsys):
    """--compare read each folder's metrics.json only when writing the model card, after training: one that
    was not JSON or lacked a key stopped the run there with a traceback and nothing written."""
    for name, text, message in [("broken", "{", "not valid JSON"), ("other", '{"accuracy": 0.9}', "neuron"),
                                ("list", "[1]", "expected a JSON object")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
        with pytest.raises(SystemExit) as e:
            train_main([*TINY, "--epochs", "1", "--compare", str(tmp_path / name), "--out", str(tmp_path / "m")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--compare" in err and "metrics.json" in err and message in err, err
        assert not (tmp_path / "m").exists()
    # a folder without metrics.json (a baseline run not kept here) gets no row; a model folder gets one
    base = _train(tmp_path, "base", "--epochs", "1")
    out = _train(tmp_path, "m", "--epochs", "1", "--compare", str(base), str(tmp_path / "absent"))
    card = (out / "README.md").read_text()
    assert "| base | sliding |" in card and "| absent |" not in card


def _unfused(folder: Path):
    """The trained net as written (batch norm not folded), rebuilt from config.json and weights.safetensors."""
    from model.network import NetConfig, PSNNet

    net = PSNNet(NetConfig.from_dict(json.loads((folder / "config.json").read_text())["net"]))
    net.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return net.eval()


def test_run_writes_what_it_did_and_says_so(tmp_path, capsys):
    """metrics.json, config.json, reference.json, the model card and the progress output against the options
    given and against the folder's own net measured again on the test split."""
    out = tmp_path / "small"
    argv = ["--dataset", "digits", "--preset", "tiny", "--epochs", "2", "--train-limit", "90", "--test-limit", "120",
            "--batch-size", "32", "--lr", "3e-2", "--weight-decay", "1e-4", "--alpha", "3", "--shift", "1",
            "--noise", "0.05", "--seed", "5", "--out", str(out)]
    assert psn_main(["train", *argv]) == 0
    err = capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    d = load_dataset("digits")
    x_tr, x_te, y_te = d.x_train[:90], d.x_test[:120], d.y_test[:120]
    # the options as given
    assert m["command"] == "psn train " + " ".join(argv)
    assert (m["dataset"], m["data"], m["neuron"], m["preset"], m["T"]) == ("digits", "digits", "sliding", "tiny", 8)
    assert (m["epochs"], m["batch_size"], m["optimizer"], m["lr"], m["weight_decay"], m["seed"]) == \
        (2, 32, "adam", 3e-2, 1e-4, 5)
    assert m["augment"] == {"shift": 1, "noise": 0.05} and m["test_fraction"] is None and m["test_data"] is None
    assert (m["train_samples"], m["test_samples"]) == (90, 120)
    # one history row per epoch; the learning rate follows the cosine over all steps (0 after the last)
    assert [r["epoch"] for r in m["history"]] == [1, 2]
    assert [r["lr"] for r in m["history"]] == pytest.approx([1.5e-2, 0.0], abs=1e-7)
    # config.json: the data's classes, its source, the scalar normalisation of the training part, alpha
    assert config["name"] == "small" and config["dataset"] == "digits" and config["class_names"] == d.class_names
    assert (config["preset"], config["data"], config["test_fraction"]) == ("tiny", "digits", None)
    net_cfg = config["net"]
    assert net_cfg["input_mean"] == pytest.approx(float(x_tr.mean()), rel=1e-6)
    assert net_cfg["input_std"] == pytest.approx(float(x_tr.std()), rel=1e-6)
    assert net_cfg["alpha"] == 3 and net_cfg["T"] is None
    # the accuracies: the folder's net measured again on the test split (parallel, streamed), and the last
    # epoch's test_acc that of the net as trained (batch norm not folded)
    loaded = load_model_folder(out)
    par = final_scores(parallel_scores(loaded.net, x_te), None).argmax(1)
    stream = streamed_scores(loaded.net, x_te).argmax(1)
    assert m["test_acc_parallel"] == pytest.approx(float((par == y_te).float().mean()), abs=1e-5)
    assert m["test_acc_streaming"] == pytest.approx(float((stream == y_te).float().mean()), abs=1e-5)
    trained = final_scores(parallel_scores(_unfused(out), x_te), None).argmax(1)
    assert m["history"][-1]["test_acc"] == pytest.approx(float((trained == y_te).float().mean()), abs=1e-5)
    # reference.json: the first test sample of each class, with the loaded net's own answers to them
    ref = json.loads((out / "reference.json").read_text())
    first = sorted(int((y_te == c).nonzero()[0]) for c in range(10))
    assert ref["test_index"] == first and ref["y"] == y_te[first].tolist()
    x_ref = torch.tensor(ref["x"])  # (T, n, F)
    assert torch.equal(x_ref, x_te[first].transpose(0, 1))
    with torch.no_grad():
        scores = loaded.net(x_ref).scores[-1]
    assert torch.allclose(scores, torch.tensor(ref["scores"]), atol=1e-5)
    assert ref["predictions"] == scores.argmax(1).tolist()
    # the model card says the same
    card = (out / "README.md").read_text()

    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    assert card.startswith("# small\n")
    assert f"parallel form: **{pct(m['test_acc_parallel'])}**" in card
    assert f"(`initial_state` + `step`): **{pct(m['test_acc_streaming'])}**" in card
    assert f"normalised inside the net as (x - {net_cfg['input_mean']:.4g}) / {net_cfg['input_std']:.4g}" in card
    curve = ", ".join(f"{t} steps: {pct(m['acc_per_step'][t - 1])}" for t in (2, 4, 6, 8))
    assert f"accuracy after t steps: {curve}" in card
    assert f"| **small** (this model) | sliding | {pct(m['test_acc_parallel'])} | {pct(m['test_acc_streaming'])} |" \
        in card
    assert "2 epochs, batch 32, adam lr 0.03 with a cosine schedule, seed 5" in card and m["machine"] in card
    assert f"```\n{m['command']}\n```" in card
    # progress: the data, the size of the net, a bar with loss and accuracy, and where it wrote what
    assert d.description in err and f"sliding k=8 preset=tiny: {m['params']} parameters" in err
    assert "loss=" in err and "test=" in err
    assert f"wrote {out}: test acc parallel {m['test_acc_parallel']:.4f}, streaming {m['test_acc_streaming']:.4f}" \
        in err


def test_quiet_run_shows_no_progress_bar(tmp_path, capsys):
    out = _train(tmp_path, "quiet", "--epochs", "1")
    err = capsys.readouterr().err
    assert "parameters" in err and f"wrote {out}" in err
    assert "loss=" not in err and "it/s" not in err


def _setup(tmp_path: Path, *options: str):
    """Options and data for a direct ``train`` call on a small variable-length data file, and a fresh net
    with a copy of its initial weights."""
    import copy

    from model.network import PSNNet
    from model.train import net_config, parse_args
    from tests.test_datafile import write_npz

    path = tmp_path / "var.npz"
    if not path.exists():
        write_npz(path, variable=True)
    a = parse_args(["--data", str(path), "--neuron", "sliding", "-k", "3", "--layers", "L16", "--threads", "1",
                    "--quiet", *options, "--out", str(tmp_path / "never")])
    torch.manual_seed(0)
    net = PSNNet(net_config(a, a.loaded))
    return a, a.loaded, net, copy.deepcopy(net)


def test_history_rows_measure_each_epoch(tmp_path):
    """With one batch of all the training data, epoch 1's loss and train_acc are those of the initial net on
    the training set (each sequence read at its own end), and test_acc that of the trained net on the test
    split; the learning rate follows the cosine over all steps, a last partial batch included."""
    from model.train import train

    a, data, net, init = _setup(tmp_path, "--epochs", "1", "--batch-size", "1000")
    row = train(net.eval(), data, a).history[0]  # whatever mode it came in, it trains in training mode
    init.train()
    with torch.no_grad():
        scores = final_scores(init(data.x_train.transpose(0, 1), data.lengths_train).scores, data.lengths_train)
    assert row["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(scores, data.y_train)), rel=1e-5)
    assert row["train_acc"] == pytest.approx(float((scores.argmax(1) == data.y_train).float().mean()), abs=1e-6)
    with torch.no_grad():
        test = final_scores(parallel_scores(net, data.x_test), data.lengths_test).argmax(1)
    assert row["test_acc"] == pytest.approx(float((test == data.y_test).float().mean()), abs=1e-6)
    assert row["epoch"] == 1 and row["lr"] == pytest.approx(0.0, abs=1e-9)
    # 90 sequences in batches of 32: three steps per epoch, the last of 26
    a, data, net, _ = _setup(tmp_path, "--epochs", "3", "--batch-size", "32", "--lr", "1e-2")
    rows = train(net, data, a).history
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * (1 + math.cos(math.pi * e / 3)) / 2 for e in (1, 2, 3)],
                                                    abs=1e-9)


def test_first_step_is_the_chosen_optimizer_with_weight_decay(tmp_path):
    """One step of all the data: Adam moves each weight by lr * g / |g| (bias-corrected first step), SGD by
    lr * g, where g is the gradient of the initial net plus weight decay times the weight."""
    from model.train import train

    lr, wd = 1e-3, 0.1
    for optimizer in ("adam", "sgd"):
        a, data, net, init = _setup(tmp_path, "--epochs", "1", "--batch-size", "1000", "--optimizer", optimizer,
                                    "--lr", str(lr), "--weight-decay", str(wd))
        train(net, data, a)
        init.train()
        scores = final_scores(init(data.x_train.transpose(0, 1), data.lengths_train).scores, data.lengths_train)
        torch.nn.functional.cross_entropy(scores, data.y_train).backward()
        after = dict(net.named_parameters())
        for name, p in init.named_parameters():
            g = p.grad + wd * p.detach()
            step = g / (g.abs() + 1e-8) if optimizer == "adam" else g
            torch.testing.assert_close(p.detach() - after[name].detach(), lr * step, rtol=1e-3, atol=lr * 1e-3,
                                       msg=f"{optimizer} {name}")


def _gradients(net, data) -> dict[str, Tensor]:
    """The gradient of the training loss of ``net`` (train mode) on all the training data at once."""
    net.train()
    net.zero_grad()
    scores = final_scores(net(data.x_train.transpose(0, 1), data.lengths_train).scores, data.lengths_train)
    torch.nn.functional.cross_entropy(scores, data.y_train).backward()
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def test_two_sgd_steps_follow_momentum_and_the_cosine_schedule(tmp_path):
    """Two epochs of one batch each: SGD (momentum 0.9) steps by lr * g1, then by lr/2 * (0.9 g1 + g2), g2 the
    gradient after the first step alone (not added to g1)."""
    from model.train import train

    lr = 1e-2
    a, data, net, init = _setup(tmp_path, "--epochs", "2", "--batch-size", "1000", "--optimizer", "sgd",
                                "--lr", str(lr))
    train(net, data, a)
    before = {name: p.detach().clone() for name, p in init.named_parameters()}
    g1 = _gradients(init, data)
    with torch.no_grad():
        for name, p in init.named_parameters():
            p -= lr * g1[name]
    g2 = _gradients(init, data)
    for name, p in net.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), lr * g1[name] + lr / 2 * (0.9 * g1[name] + g2[name]),
                                   rtol=1e-3, atol=lr * 1e-5, msg=name)


def test_masked_training_relaxes_the_mask_then_holds_it(tmp_path):
    """The first step is taken at lam = 0 (every weight of the masked layer, outside the band too, gets its
    gradient); once the schedule reaches 1 the epoch's test_acc is that of the net as served (lam = 1)."""
    from model.neurons import MaskedPSN
    from model.train import train

    a, data, net, init = _setup(tmp_path, "--neuron", "masked", "--epochs", "1", "--batch-size", "1000",
                                "--lr", "1e-3")
    train(net, data, a)
    assert all(m.lam == 1.0 for m in net.modules() if isinstance(m, MaskedPSN))  # saved as served, after one step
    init.set_lam(0.0)
    g = _gradients(init, data)
    after = dict(net.named_parameters())
    masked = [f"{name}.weight" for name, m in init.named_modules() if isinstance(m, MaskedPSN)]
    assert len(masked) == 1
    for name, p in init.named_parameters():
        if name in masked:  # (T, T): Adam's first step moves each entry with a gradient by lr
            outside = torch.ones_like(p, dtype=torch.bool).triu(1)  # t < i: a future input, outside the band
            assert bool((g[name][outside].abs() > 1e-6).any()), "no entry outside the band got a gradient"
            torch.testing.assert_close(after[name].detach(), p.detach() - 1e-3 * g[name] / (g[name].abs() + 1e-8),
                                       rtol=1e-4, atol=1e-6, msg=name)
    a, data, net, _ = _setup(tmp_path, "--neuron", "masked", "--epochs", "2", "--batch-size", "8")
    lams: list[float] = []  # lam at each training step's forward
    neuron = next(m for m in net.modules() if isinstance(m, MaskedPSN))
    neuron.register_forward_hook(lambda m, args, out: lams.append(m.lam) if m.training else None)
    result = train(net, data, a)
    total = 2 * math.ceil(90 / 8)
    assert lams == pytest.approx([min(1.0, i / total * 8) for i in range(total)], abs=1e-9)  # 1 from 1/8 on
    assert neuron.lam == 1.0
    with torch.no_grad():
        test = final_scores(parallel_scores(net, data.x_test), data.lengths_test).argmax(1)
    assert result.history[-1]["test_acc"] == pytest.approx(float((test == data.y_test).float().mean()), abs=1e-6)


def test_seed_alone_orders_the_data_and_augmentation_changes_only_training(tmp_path):
    """From the same initial weights: the same seed trains the same weights, another seed (another data
    order) others; --noise or --shift change training, while each epoch's test_acc is still measured on the
    test split as it is."""
    from model.train import train

    def weights(*options: str):
        a, data, net, _ = _setup(tmp_path, "--epochs", "1", "--batch-size", "16", *options)
        torch.manual_seed(123)  # whatever the global generator holds, only the seed may decide
        result = train(net, data, a)
        with torch.no_grad():
            test = final_scores(parallel_scores(net, data.x_test), data.lengths_test).argmax(1)
        assert result.history[-1]["test_acc"] == pytest.approx(float((test == data.y_test).float().mean()), abs=1e-6)
        return [p.detach().clone() for p in net.parameters()]

    def same(u, v):
        return all(torch.equal(p, q) for p, q in zip(u, v, strict=True))

    base = weights("--seed", "3")
    assert same(base, weights("--seed", "3"))
    assert not same(base, weights("--seed", "4"))
    assert not same(base, weights("--seed", "3", "--noise", "0.3"))
    assert not same(base, weights("--seed", "3", "--shift", "2"))


def test_augment_shifts_each_sample_within_its_range_and_adds_noise():
    from model.train import augment

    T, B = 6, 400
    x = torch.arange(1, T + 1, dtype=torch.float32).view(T, 1, 1).expand(T, B, 1).clone()  # step t holds t + 1
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(1))
    out, new_lengths = augment(x, 2, 0.0, torch.Generator().manual_seed(0), lengths)
    shifts = []
    for b in range(B):
        col = out[:, b, 0]
        # a shift by s: step t holds the input's step t - s, zero where that is outside 0..T-1
        match = [s for s in range(-T, T + 1)
                 if torch.equal(col, torch.tensor([float(t - s + 1) if 0 <= t - s < T else 0.0 for t in range(T)]))]
        assert len(match) == 1, col
        shifts.append(match[0])
    assert sorted(set(shifts)) == [-2, -1, 0, 1, 2]
    assert new_lengths.tolist() == [min(max(int(n) + s, 1), T) for n, s in zip(lengths, shifts, strict=True)]
    noisy, none = augment(x, 0, 0.5, torch.Generator().manual_seed(0))
    assert none is None and abs(float((noisy - x).std()) - 0.5) < 0.05 and abs(float((noisy - x).mean())) < 0.05
    same, _ = augment(x, 0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, x)


def test_masked_layers_start_from_the_exponential_kernel(tmp_path):
    """With a learning rate too small to move them, the saved masked weights are the initial ones: 2^-(t-i)
    in the band 0 <= t - i < k, zero elsewhere."""
    out = _train(tmp_path, "masked", "--neuron", "masked", "-k", "3", "--layers", "L16,L16", "--epochs", "1",
                 "--lr", "1e-9")
    w = {k: v for k, v in load_file(str(out / "weights.safetensors")).items() if v.dim() == 2 and v.shape == (8, 8)}
    assert len(w) == 2, list(w)
    band = torch.tensor([[2.0 ** -(t - i) if 0 <= t - i < 3 else 0.0 for i in range(8)] for t in range(8)])
    for name, weight in w.items():
        torch.testing.assert_close(weight, band, atol=1e-6, rtol=0, msg=name)


def test_parallel_only_neuron_writes_a_folder_without_streaming_results(tmp_path):
    """--neuron psn has no step form: the folder says streaming n/a (metrics, card, progress) and still
    reproduces its reference predictions."""
    out = _train(tmp_path, "psn", "--neuron", "psn", "--epochs", "1")
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_acc_streaming"] is None and m["test_acc_parallel"] is not None
    card = (out / "README.md").read_text()
    assert "(`initial_state` + `step`): **n/a**" in card and "| **psn** (this model) | psn |" in card
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert check_reference(out) < 1e-4


def test_limits_cut_variable_length_data_with_their_lengths(tmp_path):
    """--train-limit and --test-limit on sequences of their own lengths: each kept sequence keeps its length."""
    from tests.test_datafile import write_npz

    path = write_npz(tmp_path / "var.npz", variable=True)
    out = tmp_path / "cut"
    assert psn_main(["train", "--data", str(path), "--neuron", "sliding", "-k", "3", "--layers", "L16", "--epochs", "1",
                     "--train-limit", "30", "--test-limit", "10", "--quiet", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["train_samples"], m["test_samples"]) == (30, 10)
    ref = json.loads((out / "reference.json").read_text())
    with np.load(path) as f:
        assert ref["lengths"] == f["lengths_test"][ref["test_index"]].tolist()
    assert check_reference(out) < 1e-4
