"""Training command end to end, option checks, and the shipped models in exported/."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
